"""Where one `attend` call's host time goes, by component (docs/host.md, "Round 7").

Runs the host suite's cases (`python -m sasa_triton.report --suite host`: batch 1, bf16,
the driver stubbed, "auto" choosing as on a GPU with no tuned table) and prints, per
case, medians of warm calls in microseconds:

* forward, each piece timed alone (no_grad): `attend`; `check_call` (the cached checks);
  `attend_op` (op-level glue and the launcher); the launcher's `forward`; one repeat
  `launch_kernel` of its launch; the launch's `fast_key`; the launcher's two output
  allocations;
* forward + backward (`torch.autograd.grad`, as the suite times it), each piece timed
  inside the real call by wrapping it (a wrapper adds about 0.2 us): the autograd
  Function's forward body, the launcher's forward, the backward body, the launcher's
  backward, each `launch_kernel`; the rest is torch (Function.apply, the autograd engine,
  saved tensors) and `attend`'s own work.

Pieces inside a warm training step run slower than alone (caches): compare a piece with
itself, not across the two tables.

Usage: python scripts/host_split.py [--cases s2-b1,s4-b1] [--reps 2000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bind_costs import median_us  # noqa: E402  (the same warm median as the binder costs)


def _leaves(step) -> dict:
    """The tensors and window a host-suite step closes over (q, k, v, rel_h, rel_w, kernel)."""
    return dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__)))


def forward_split(steps, reps: int) -> dict:
    """The forward's pieces, each timed alone under no_grad."""
    import sasa_triton
    from sasa_triton import ops
    from sasa_triton.args import check_call
    from sasa_triton.kernels import common, fast_launch
    from sasa_triton.report import host

    cells = _leaves(steps["fwd_grad"])
    q, k, v, rel_h, rel_w, window = (cells[n] for n in ("q", "k", "v", "rel_h", "rel_w", "kernel"))
    args, checked = check_call(q, k, v, window, 1, "zeros", rel_h, rel_w, None, None)
    rows = {"fwd step (the suite's: no_grad + attend)": median_us(steps["fwd"], reps)}
    with torch.no_grad():
        forward, config, _ = ops._impl("auto", 0, q, args, "", checked)
        (launch,) = host._launches(lambda: forward(q, k, v, args, config))
        kernel, kernel_args, options = launch
        slot = next(s for s in fast_launch._SLOTS.values() if s.kernel is kernel)
        plan = slot.plan
        rows.update({
            "attend": median_us(lambda: sasa_triton.attend(q, k, v, window, rel_h=rel_h,
                                                            rel_w=rel_w), reps),
            "  check_call": median_us(lambda: check_call(q, k, v, window, 1, "zeros", rel_h,
                                                          rel_w, None, None), reps),
            "  attend_op": median_us(lambda: ops.attend_op(q, k, v, args, "auto",
                                                            checked=checked), reps),
            "    launcher forward": median_us(lambda: forward(q, k, v, args, config), reps),
            "      launch_kernel": median_us(lambda: fast_launch.launch_kernel(
                kernel, plan, *kernel_args, **options), reps),
            "        fast_key": median_us(lambda: fast_launch.fast_key(slot, kernel_args, 0),
                                           reps),
            "      out + lse allocations": median_us(
                lambda: common.alloc_outputs(q, False, plan.layouts[0] if plan.layouts else None),
                reps),
        })
    return rows


def training_split(steps, reps: int) -> dict:
    """The forward + backward's pieces, timed inside the real call."""
    from sasa_triton import ops
    from sasa_triton.args import check_call
    from sasa_triton.kernels import fast_launch

    cells = _leaves(steps["fwd_grad"])
    q, k, v, rel_h, rel_w, window = (cells[n] for n in ("q", "k", "v", "rel_h", "rel_w", "kernel"))
    args, checked = check_call(q, k, v, window, 1, "zeros", rel_h, rel_w, None, None)
    with torch.no_grad():
        forward = ops._impl("auto", 0, q, args, "", checked)[0]
        backward = ops._impl("auto", 1, q, args, "", checked)[0]
    samples: dict = {}
    patched = []

    def wrap(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter_ns()
            try:
                return inner(*a, **kw)
            finally:
                samples.setdefault(label, []).append(time.perf_counter_ns() - t0)

        patched.append((owner, name, inner))
        setattr(owner, name, timed)

    launchers = [sys.modules[f.__module__] for f in (forward, backward)]
    try:
        wrap(ops._EagerAttend, "forward", "Function forward body")
        wrap(launchers[0], forward.__name__, "  launcher forward")
        wrap(ops, "_eager_backward", "backward body")
        wrap(launchers[1], backward.__name__, "  launcher backward")
        launch = fast_launch.launch_kernel
        for module in list(sys.modules.values()):  # launchers import launch_kernel by name
            if (getattr(module, "__name__", "").startswith("sasa_triton.kernels.")
                    and module is not fast_launch
                    and getattr(module, "launch_kernel", None) is launch):
                wrap(module, "launch_kernel", "launch_kernel (each)")
        total = median_us(steps["fwdbwd"], reps)
    finally:
        for owner, name, inner in reversed(patched):
            setattr(owner, name, inner)
    rows = {"fwdbwd step (instrumented)": total}
    for label, values in samples.items():
        calls = len(values) // (reps + 200)
        rows[f"{label} x{calls}"] = statistics.median(values[len(values) // 2:]) / 1000
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="s2-b1,s4-b1")
    parser.add_argument("--reps", type=int, default=2000)
    opts = parser.parse_args()
    from sasa_triton.report import host

    torch.set_num_threads(1)
    shapes = [s for s in host.host_cases("cpu") if s.name in opts.cases.split(",")]
    with host.stub_launches():
        for shape in shapes:
            steps, null, impls = host._steps(shape, torch.bfloat16, torch.device("cpu"))
            for _ in range(20):
                steps["fwdbwd"]()
            rows = forward_split(steps, opts.reps)
            rows["torch floor fwd (no_grad)"] = median_us(null["fwd"], opts.reps)
            rows.update(training_split(steps, opts.reps))
            rows["torch floor fwdbwd"] = median_us(null["fwdbwd"], opts.reps)
            print(f"{shape.name} ({impls[0]} / {impls[1]}), us")
            for label, value in rows.items():
                print(f"  {label:44s} {value:7.2f}")


if __name__ == "__main__":
    main()
