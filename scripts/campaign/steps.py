"""The campaign's steps: what each runs, on a GPU and in the CPU rehearsal, and its budget.

A step is a function of a `Context` returning (status, detail); it runs its commands
through `ctx.run`, which stops them at the step's deadline. Budgets are in seconds: on an
H100 each step stays under 8 minutes (one device command of at most 10) and `all` sums
to 26 minutes; the rehearsal's sum to 5 minutes. Statuses: ok | failed | timed out |
not available (and interrupted, set by the campaign on Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Callable

from . import bench_table, procs
from .procs import Command

HERE = Path(__file__).resolve().parent

IMPORT_CHECK = """\
import importlib, pathlib, sys
repo = pathlib.Path(sys.argv[1]).resolve()
for name in ("sasa_triton", "sasa_triton.kernels", "sasa_triton.autotune",
             "sasa_triton.report", "sasa_triton.nn"):
    path = pathlib.Path(importlib.import_module(name).__file__).resolve()
    print(f"{name}: {path}")
    if repo not in path.parents:
        sys.exit(f"{name} imports from {path}, not from this checkout ({repo}): "
                 "run the install step (pip install --no-deps --no-build-isolation -e .)")
print("imports ok")
"""


@dataclasses.dataclass
class Context:
    repo: Path
    work: Path  # the results folder that is packed
    rehearse: bool
    python: str
    env: dict
    deadline: float
    say: Callable

    def dir(self, step: str) -> Path:
        path = self.work / step
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, commands: list, parallel: int = 1) -> list:
        return procs.run(commands, self.env, self.repo, self.deadline, parallel, self.say)

    def py(self, *args) -> list:
        return [self.python, *map(str, args)]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    gpu_budget_s: int
    rehearse_budget_s: int
    run: Callable
    what: str


def _status(outcomes: list) -> str:
    if all(o.ok for o in outcomes):
        return "ok"
    return "timed out" if any(o.timed_out for o in outcomes) else "failed"


def _why(outcomes: list) -> str:
    bad = [o for o in outcomes if not o.ok]
    return "; ".join(f"{o.name}: {'timed out' if o.timed_out else f'exit {o.rc}'} "
                     f"({procs.last_words(o.log)[:160]}; {o.log.name})" for o in bad)


def import_check(ctx: Context, log: Path) -> procs.Outcome:
    return ctx.run([Command("imports", ctx.py("-c", IMPORT_CHECK, ctx.repo), log,
                            cap_s=120)])[0]


# --- install -----------------------------------------------------------------------

def install(ctx: Context) -> tuple:
    """Offline editable install (no build isolation: nothing is fetched), then every
    subpackage must import from this checkout. The rehearsal builds the wheel with
    --dry-run and leaves the environment as it is."""
    d = ctx.dir("install")
    pip = ["-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    pip += ["--dry-run"] * ctx.rehearse + ["-e", ctx.repo]
    out = ctx.run([Command("pip", ctx.py(*pip), d / "pip.log")])[0]
    if not out.ok:
        return "failed", f"pip install failed, the other steps cannot run: {_why([out])}"
    imports = import_check(ctx, d / "imports.log")
    if not imports.ok:
        return "failed", (f"installed, but the package does not import, the other steps "
                          f"cannot run: {procs.tail(imports.log, 2)}")
    return "ok", "installed; sasa_triton, .kernels, .autotune, .report, .nn import"


# --- check -------------------------------------------------------------------------

EXISTING_TESTS = {  # file -> the rehearsal's -k subset (the full files run on the GPU)
    "test_kernels_forward.py": "test_forward_matches_oracle and B1-H5W7",
    "test_kernels_backward.py": "test_deterministic or test_broadcast_dout",
    "test_autograd_compile.py": "test_kernel_backward_through_autograd and H5W6",
}
GPU_SHARDS, REHEARSE_SHARDS = 6, 2


def check(ctx: Context) -> tuple:
    """The kernel tests on the real compiler and tests/campaign_check.py, in parallel
    processes (compiling is what takes the time)."""
    d = ctx.dir("check")
    if ctx.rehearse:
        ctx.say("  rehearsal: interpreter, toy sizes, -k subsets of the kernel tests and a "
                "covering sample of campaign_check's product; the > 2**31-element case is "
                "skipped (it needs a GPU)")
    commands = []
    for name, subset in EXISTING_TESTS.items():
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{name}",
                f"--junitxml={d / ('junit-' + name[:-3] + '.xml')}"]
        if ctx.rehearse:
            args += ["-k", subset]
        elif importlib.util.find_spec("xdist"):  # two workers per file compile in parallel
            args += ["-n", "2"]
        commands.append(Command(name[:-3], ctx.py(*args), d / f"{name[:-3]}.log"))
    shards = REHEARSE_SHARDS if ctx.rehearse else GPU_SHARDS
    for i in range(shards):
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/campaign_check.py",
                f"--junitxml={d / f'junit-campaign_check-{i}.xml'}"]
        commands.append(Command(f"campaign_check-{i}of{shards}", ctx.py(*args),
                                d / f"campaign_check-{i}.log",
                                env={"SASA_CHECK_SHARD": f"{i}/{shards}"}))
    outcomes = ctx.run(commands, parallel=2 if ctx.rehearse else 9)
    counts: dict = {}
    for o in outcomes:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)",
                                  procs.tail(o.log, 3)):
            counts[word] = counts.get(word, 0) + int(n)
    tally = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no test summary"
    status = _status(outcomes)
    return status, tally + ("" if status == "ok" else f"; {_why(outcomes)}")


# --- tune --------------------------------------------------------------------------

def tune(ctx: Context) -> tuple:
    """A quick table for the suite (2 configs per variant and key, the default first),
    written to the user table folder (later steps' attend uses it) and copied here."""
    d = ctx.dir("tune")
    cache = Path(ctx.env["SASA_TRITON_CACHE_DIR"])
    if ctx.rehearse:
        args = ["--device", "cpu", "--key", "B=1,H=6,W=5,heads=2,d=8,k=3", "--direction",
                "both", "--dtype", "fp32", "--limit", "1"]
    else:
        args = ["--suite", "resnet50,det,ksweep,heads", "--direction", "both", "--dtype",
                "bf16", "--limit", "2"]
    args += ["--out", cache]
    outcomes = ctx.run([
        Command("plan", ctx.py("-m", "sasa_triton.autotune", "--dry-run", *args),
                d / "plan.log", cap_s=90),
        Command("tune", ctx.py("-m", "sasa_triton.autotune", *args), d / "tune.log")])
    # the folder's tables (keys tuned by an earlier run on this machine are kept there)
    tables = sorted(cache.glob("*.json"))
    for p in tables:
        shutil.copy2(p, d / p.name)
    found = f"table {', '.join(p.name for p in tables) or 'not written'}"
    status = _status(outcomes)
    if status == "timed out" and tables:
        return status, f"{found} holds the keys tuned before the limit; {_why(outcomes)}"
    return status, found + ("" if status == "ok" else f"; {_why(outcomes)}")


# --- bench -------------------------------------------------------------------------

BENCH_IMPLS = "attend*,unfold,flex_na_rel,conv*"


def bench(ctx: Context) -> tuple:
    """The PERF suite in one report process: attend (dispatched and forced), the unfold
    port, FlexAttention NA + SASA rel and the three cuDNN convs, fwd and fwd+bwd, with the
    floor, host time and peak memory; prints the short table."""
    d = ctx.dir("bench")
    args = ["-m", "sasa_triton.report", "--direction", "both", "--impl", BENCH_IMPLS,
            "--out", d]
    args += (["--suite", "quick", "--cpu-budget", "0.02", "--min-reps", "2"] if ctx.rehearse
             else ["--suite", "all"])
    out = ctx.run([Command("report-all", ctx.py(*args), d / "bench.log")])[0]
    csv_path = d / "results.csv"
    if not csv_path.exists():
        return "failed", f"no results.csv: {_why([out])}"
    text = bench_table.table(csv_path)
    (d / "table.md").write_text(text)
    status = _status([out])
    rows = sum(1 for _ in open(csv_path)) - 1
    return status, f"{rows} rows in bench/results.csv" + ("" if status == "ok"
                                                          else f"; {_why([out])}")


# --- report ------------------------------------------------------------------------

def report(ctx: Context) -> tuple:
    """`python -m sasa_triton.report` with every implementation (FlexAttention both
    ways, the layers too): resnet50 and det, each its folder with CSV, charts, summary."""
    d = ctx.dir("report")
    if ctx.rehearse:
        suites = {"quick": None}
        extra = ["--cpu-budget", "0.02", "--min-reps", "2"]
    else:
        suites, extra = {"resnet50": 150, "det": 60}, []
    outcomes = ctx.run([Command(s, ctx.py("-m", "sasa_triton.report", "--suite", s,
                                          "--out", d / s, *extra), d / f"{s}.log", cap_s=cap)
                        for s, cap in suites.items()])
    written = [s for s in suites if (d / s / "results.csv").exists()]
    status = _status(outcomes)
    return status, f"written: {', '.join(written) or 'nothing'}" + (
        "" if status == "ok" else f"; {_why(outcomes)}")


# --- e2e ---------------------------------------------------------------------------

def e2e(ctx: Context) -> tuple:
    """examples/bench_resnet.py: SASA-ResNet-50 vs ResNet-50, train and infer images/s."""
    d = ctx.dir("e2e")
    args = ["examples/bench_resnet.py", "--csv", d / "e2e.csv"]
    if ctx.rehearse:
        args += ["--device", "cpu", "--batch", "2", "--size", "32", "--steps", "1",
                 "--warmup", "1", "--dtype", "fp32", "--classes", "10", "--models",
                 "sasa_resnet26", "conv_resnet26"]
    out = ctx.run([Command("bench_resnet", ctx.py(*args), d / "e2e.log")])[0]
    status = _status([out])
    if status != "ok":
        return status, _why([out])
    rows = [" ".join(line.split()) for line in procs.tail(out.log, 12).splitlines()
            if line.split() and line.split()[0].endswith(("resnet50", "resnet26"))]
    return status, "model, train img/s, MiB, infer img/s, MiB: " + "; ".join(rows)


# --- sanitize ----------------------------------------------------------------------

def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for path in sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer")):
        return str(path)
    return None


def sanitize(ctx: Context) -> tuple:
    """compute-sanitizer memcheck and racecheck over sanitize_subset.py when the tool is
    here; otherwise the subset runs plainly and the step says 'not available'."""
    d = ctx.dir("sanitize")
    subset = HERE / "sanitize_subset.py"
    tool = None if ctx.rehearse else find_sanitizer()
    plain = Command("subset", ctx.py(subset), d / "subset.log", cap_s=150)
    if tool is None:
        why = ("rehearsal on CPU" if ctx.rehearse
               else "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin")
        (d / "sanitize.log").write_text(f"compute-sanitizer: not available ({why}); the "
                                        "subset ran without it (subset.log)\n")
        out = ctx.run([plain])[0]
        return "not available", f"{why}; subset without it: {'ok' if out.ok else _why([out])}"
    runs = [plain]  # compiles the kernels first, outside the sanitizer
    for name in ("memcheck", "racecheck"):
        runs.append(Command(name, [tool, "--tool", name, "--error-exitcode", "1",
                                   "--print-limit", "30", *ctx.py(subset)], d / f"{name}.log",
                            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    outcomes = ctx.run(runs)
    refused = [o.name for o in outcomes[1:] if "Device not supported" in procs.tail(o.log, 40)]
    if refused:  # e.g. under gVisor the tool is installed but cannot attach to the GPU
        return "not available", f"compute-sanitizer refused the device ({', '.join(refused)}" \
            f".log: Device not supported); subset without it: " \
            f"{'ok' if outcomes[0].ok else _why(outcomes[:1])}"
    status = _status(outcomes)
    return status, "memcheck and racecheck clean" if status == "ok" else _why(outcomes)


STEPS = {s.name: s for s in [
    Step("install", 60, 25, install, "offline editable install, import every subpackage"),
    Step("check", 360, 90, check, "kernel tests on the real compiler + campaign_check"),
    Step("tune", 300, 30, tune, "quick tuned table for the PERF suite"),
    Step("bench", 420, 45, bench, "PERF suite, all baselines, floor, host time, one CSV"),
    Step("report", 210, 45, report, "report: resnet50 and det suites, charts, summary"),
    Step("e2e", 120, 45, e2e, "SASA-ResNet-50 vs ResNet-50, train and infer images/s"),
    Step("sanitize", 90, 20, sanitize, "compute-sanitizer memcheck/racecheck, subset"),
]}
ORDER = list(STEPS)
