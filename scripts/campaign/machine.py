"""machine.json: what ran the campaign (GPU, driver, versions, kernel source hash, commit).

`kernels_hash(folder)` is the hash the tuned tables carry (sasa_triton.autotune's: sha256
over kernels/*.py, sorted, each name and content); tests/test_campaign.py holds the two
equal. Run as a script (`python machine.py REPO`) it prints the JSON; torch and the
package are imported only there, in a subprocess of the campaign.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional


def kernels_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def gpu_slug(name: str) -> str:
    """The folder and table name of a GPU, as the autotune tables spell it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def git_state(repo: Path) -> dict:
    def git(*args) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                  text=True, timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    note = None
    if not commit:  # a copy of the tree without .git: the caller may name the commit
        commit = os.environ.get("SASA_CAMPAIGN_COMMIT") or None
        note = ("no git checkout here; commit from SASA_CAMPAIGN_COMMIT" if commit
                else "no git checkout here (a copy of the tree); set SASA_CAMPAIGN_COMMIT")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None,
            "git_note": note}


def installed_kernels_hash() -> Optional[str]:
    """The autotune package's own kernels_hash() (sasa_triton.autotune.tuned_table's)."""
    module = importlib.import_module("sasa_triton.autotune.tuned_table")
    fn = getattr(module, "kernels_hash", None)
    return fn() if callable(fn) else None


def _driver() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def probe(repo: Path) -> dict:
    """Everything machine.json holds; what cannot be found is None, with a note."""
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
                      "%Y-%m-%dT%H:%M:%SZ"),
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(),
                  "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
                  "kernels_hash": kernels_hash(repo / "kernels"), **git_state(repo)}
    from importlib import metadata

    for pkg in ("torch", "triton", "numpy", "pandas", "matplotlib"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch

        cuda = torch.cuda.is_available()
        info.update(cuda_available=cuda, torch_cuda=torch.version.cuda,
                    gpu=torch.cuda.get_device_name() if cuda else None,
                    cudnn=torch.backends.cudnn.version() if cuda else None,
                    gpu_memory_gib=(round(torch.cuda.get_device_properties(0).total_memory
                                          / 2**30, 1) if cuda else None),
                    driver=_driver())
    except Exception as e:  # recorded: the steps say what follows from it
        info.update(cuda_available=False, gpu=None, torch_error=f"{type(e).__name__}: {e}")
    info["gpu_slug"] = gpu_slug(info["gpu"]) if info.get("gpu") else None
    try:
        info["kernels_hash_installed"] = installed_kernels_hash()
        info["sasa_triton_path"] = str(Path(importlib.import_module("sasa_triton").__file__)
                                       .parent)
    except Exception as e:
        info["kernels_hash_installed"] = None
        info["import_error"] = f"{type(e).__name__}: {e}"
    return info


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]).resolve()), indent=1, sort_keys=True))
