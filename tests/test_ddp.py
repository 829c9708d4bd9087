"""examples/train_ddp.py under torchrun (2 processes, gloo, CPU): a DDP step equals a
one-process step over the same global batch, and a resumed run continues exactly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
# float64 so that "equal" can be tight: DDP sums the two half-batch gradients in another
# order than one process does, which float32 would blur to ~1e-7
COMMON = ["--batch", "8", "--dtype", "float64", "--save-every", "1"]


def _train(args: list, processes: int) -> None:
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launcher + [str(EXAMPLE), *COMMON, *args], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu")


def test_ddp_step_equals_one_process_step_and_resume_is_exact(tmp_path):
    ddp, one, resumed = tmp_path / "ddp", tmp_path / "one", tmp_path / "resumed"
    _train(["--steps", "3", "--ckpt-dir", str(ddp)], processes=2)
    _train(["--steps", "1", "--ckpt-dir", str(one)], processes=0)

    step1, single = _load(ddp / "step1.pt")["model"], _load(one / "step1.pt")["model"]
    step2 = _load(ddp / "step2.pt")["model"]
    assert step1.keys() == single.keys()
    moved = 0
    for name, value in step1.items():
        torch.testing.assert_close(value, single[name], atol=1e-12, rtol=1e-10, msg=name)
        moved += not torch.equal(value, step2[name])
    assert moved > len(step1) // 2  # the steps do train most tensors

    resumed.mkdir()
    shutil.copy(ddp / "step2.pt", resumed / "last.pt")
    _train(["--steps", "3", "--ckpt-dir", str(resumed), "--resume"], processes=2)
    expected, got = _load(ddp / "step3.pt"), _load(resumed / "step3.pt")
    assert got["step"] == expected["step"] == 3
    for name, value in expected["model"].items():
        assert torch.equal(value, got["model"][name]), name
    for a, b in zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
