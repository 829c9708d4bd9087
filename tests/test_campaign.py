"""The GPU campaign (scripts/gpu_campaign.sh) stays runnable between GPU windows: a fast
part of its CPU rehearsal (install + tune, packed), the ingest of that tarball, and the
pieces the GPU run leans on (time limits, partial reports, the kernel hash, the README).
The whole rehearsal (`scripts/gpu_campaign.sh all --rehearse`, about 4 minutes) is not
run here."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_campaign  # noqa: E402
import ingest_gpu_results as ingest_mod  # noqa: E402
from campaign import bench_table, machine, pack, procs  # noqa: E402
from campaign.steps import ORDER, STEPS  # noqa: E402


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """install + tune rehearsed on CPU, as a GPU command would run them (--out)."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = dict(os.environ, PIP_NO_INDEX="1")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_campaign.py"),
                          "install", "tune", "--rehearse", "--out", str(out), "--work",
                          str(work)], env=env, capture_output=True, text=True, timeout=300)
    return run, out, work


def test_rehearsal_runs_install_and_tune_and_packs_one_tarball(rehearsal):
    run, out, work = rehearsal
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "summary.md"]
    with tarfile.open(out / pack.TARBALL) as tar:
        names = set(tar.getnames())
    for name in ("machine.json", "steps.json", "summary.md", "campaign.log",
                 "install/pip.log", "install/imports.log", "tune/tune.log",
                 "tune/cpu-interpreter.json"):
        assert f"gpu-results/{name}" in names, name
    info = json.loads((work / "machine.json").read_text())
    assert info["mode"] == "rehearsal" and info["triton_interpret"]
    assert info["kernels_hash"] == machine.kernels_hash(REPO / "kernels")
    assert info["kernels_hash_installed"] == info["kernels_hash"]  # autotune's own hash
    for key in ("torch", "triton", "python", "git_commit", "driver", "gpu"):
        assert key in info, key
    steps = json.loads((work / "steps.json").read_text())
    assert {n: s["status"] for n, s in steps.items()} == {"install": "ok", "tune": "ok"}
    table = json.loads((work / "tune" / "cpu-interpreter.json").read_text())
    assert table["kernels_hash"] == info["kernels_hash"] and len(table["entries"]) == 2
    assert "budget" in run.stdout and "| tune | 30 |" in (out / "summary.md").read_text()


def test_ingest_places_every_file_of_the_rehearsal(rehearsal, tmp_path):
    _, out, _ = rehearsal
    with tarfile.open(out / pack.TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    written = ingest_mod.ingest(out / pack.TARBALL, tmp_path, say=lambda s: None)
    assert len(written) == len(members) == len(set(written))
    assert (tmp_path / "autotune/tables/cpu-interpreter.json").exists()
    assert (tmp_path / "reports/cpu-rehearsal/campaign/machine.json").exists()
    assert (tmp_path / "reports/cpu-rehearsal/campaign/tune/tune.log").exists()
    # the rehearsal holds no GPU numbers: not into this checkout unless forced
    with pytest.raises(ingest_mod.Refused, match="rehearsal"):
        ingest_mod.ingest(out / pack.TARBALL, tmp_path, to_checkout=True)


def _fake_results(tmp_path, kernels_hash) -> Path:
    work = tmp_path / "work"
    for rel, text in {"machine.json": json.dumps(dict(mode="gpu", gpu="NVIDIA H100 80GB HBM3",
                                                      gpu_slug="nvidia-h100-80gb-hbm3",
                                                      kernels_hash=kernels_hash)),
                      "bench/results.csv": "case\ns1\n", "bench/table.md": "|",
                      "report/resnet50/results.csv": "case\n", "tune/nvidia-h100-80gb-hbm3.json":
                      "{}", "check/junit-x.xml": "<x/>"}.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    return pack.pack(work, tmp_path / "out")[0]


def test_ingest_layout_and_kernel_hash_refusal(tmp_path):
    ours = machine.kernels_hash(REPO / "kernels")
    tarball = _fake_results(tmp_path, ours)
    dest = tmp_path / "dest"
    placed = {p.relative_to(dest).as_posix() for p in
              ingest_mod.ingest(tarball, dest, say=lambda s: None)}
    g = "reports/nvidia-h100-80gb-hbm3"
    assert placed == {f"{g}/campaign/machine.json", f"{g}/bench.csv", f"{g}/bench/table.md",
                      f"{g}/resnet50/results.csv", "autotune/tables/nvidia-h100-80gb-hbm3.json",
                      f"{g}/campaign/check/junit-x.xml"}
    stale = _fake_results(tmp_path / "stale", "0" * 64)
    with pytest.raises(ingest_mod.Refused, match="other kernel sources.*--force"):
        ingest_mod.ingest(stale, tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()
    assert ingest_mod.main([str(stale), "--dest", str(tmp_path / "dest2")]) == 2
    assert ingest_mod.main([str(stale), "--dest", str(tmp_path / "dest2"), "--force"]) == 0


def test_gpu_mode_without_a_gpu_fails_each_step_with_the_reason(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_campaign.py"), "e2e",
                          "sanitize", "--out", str(tmp_path / "out"), "--work",
                          str(tmp_path / "work")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    steps = json.loads((tmp_path / "work" / "steps.json").read_text())
    assert [s["status"] for s in steps.values()] == ["failed", "failed"]
    assert all("--rehearse" in s["detail"] for s in steps.values())
    assert (tmp_path / "out" / pack.TARBALL).exists()  # still packed, with the reason


def test_kernels_hash_is_the_autotune_tables_hash():
    assert machine.kernels_hash(REPO / "kernels") == machine.installed_kernels_hash()


def test_a_command_over_its_limit_is_stopped_and_the_next_one_runs(tmp_path):
    sleeper = procs.Command("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                            tmp_path / "sleeper.log", cap_s=2)
    quick = procs.Command("quick", [sys.executable, "-c", "print('hi')"], tmp_path / "q.log")
    start = time.time()
    slow, fast = procs.run([sleeper, quick], dict(os.environ), tmp_path, time.time() + 60,
                           say=lambda s: None)
    assert slow.timed_out and not slow.ok and time.time() - start < 40
    assert fast.ok and "hi" in fast.log.read_text()
    assert "stopped at its time limit" in slow.log.read_text()


def test_report_keeps_the_rows_measured_before_an_interrupt():
    from sasa_triton.perf_suite import Shape
    from sasa_triton.report.runner import run_suite

    lines = []

    def log(text):
        lines.append(text)
        if text.startswith("[2/"):
            raise KeyboardInterrupt

    result = run_suite(shapes=[Shape("t", 1, 6, 6, 8, 2, k=3)], impl_filter="conv_*",
                       device="cpu", budget_s=0.0, min_reps=1, log=log)
    assert len(result.rows) == 2 and any("interrupted" in s for s in lines)
    row = result.rows[0]
    assert row["status"] == "ok" and row["host_us"] == row["median_us"]
    assert row["impl"] == "conv_kxk" and row["ratio_to_dense_conv"] == 1.0
    assert "ratio_to_flex_na_rel" in row and "ratio_to_conv_3x3" in row


def test_bench_table_and_packing_limits(tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text("case,impl,direction,status,median_us,ratio_to_floor,host_us\n"
                   "s1,attend,fwd,ok,100,5,20\ns1,attend:tiled,fwd,ok,90,4.5,20\n"
                   "s1,attend:tile2d,fwd,error: x,,,\n")
    text = bench_table.table(csv)
    assert "| s1 | fwd | ok | 100 | 5 |" in text and "tiled 90 us" in text
    (tmp_path / "big.log").write_bytes(b"x" * (3 * 2**20))
    path, size, left_out = pack.pack(tmp_path, tmp_path / "o")
    assert size < 2**20 and left_out == []  # the log was cut to its first and last half MiB


def test_steps_budgets_and_readme_agree():
    assert ORDER[0] == "install" and gpu_campaign.step_list(["all"]) == ORDER
    assert gpu_campaign.step_list(["bench", "check"]) == ["check", "bench"]
    assert all(s.gpu_budget_s < 8 * 60 for s in STEPS.values())
    assert sum(s.gpu_budget_s for s in STEPS.values()) <= 27 * 60
    assert sum(s.rehearse_budget_s for s in STEPS.values()) <= 5 * 60
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on a GPU", 1)[1].split("\n## ", 1)[0]
    for step in STEPS.values():
        row = re.search(rf"^\| `{step.name}` \| (\d+) \| (\d+) \|", section, re.M)
        assert row, f"README lacks the {step.name} row"
        assert (int(row[1]), int(row[2])) == (step.gpu_budget_s, step.rehearse_budget_s)
    assert "ingest_gpu_results.py" in section and not (REPO / "reports/run_gpu.sh").exists()
