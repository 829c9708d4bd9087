"""Packs the results folder into gpu-results.tar.gz, under the size that comes back."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

TARBALL = "gpu-results.tar.gz"
TOP = "gpu-results"  # the folder the tarball unpacks to
LIMIT_BYTES = 15 * 2**20  # files come back from the GPU machine up to 16 MiB each
LOG_KEEP_BYTES = 1 * 2**20  # a longer text file keeps its first and last half MiB


def _data(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix in (".log", ".txt", ".xml") and len(data) > LOG_KEEP_BYTES:
        half = LOG_KEEP_BYTES // 2
        cut = len(data) - 2 * half
        data = data[:half] + f"\n[... {cut} bytes cut by the campaign ...]\n".encode() + \
            data[-half:]
    return data


def pack(folder: Path, out: Path) -> tuple:
    """Writes out/gpu-results.tar.gz from folder; returns (path, size, [left out]).
    Over the limit, charts go first (SVG, then PNG): the CSVs and logs hold the numbers."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    left_out: list = []
    for drop in ((), (".svg",), (".svg", ".png")):
        kept = [p for p in files if p.suffix not in drop]
        left_out = [str(p.relative_to(folder)) for p in files if p.suffix in drop]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in kept:
                data = _data(p)
                info = tarfile.TarInfo(f"{TOP}/{p.relative_to(folder).as_posix()}")
                info.size, info.mtime, info.mode = len(data), int(p.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
        if buf.tell() <= LIMIT_BYTES:
            break
    out.mkdir(parents=True, exist_ok=True)
    path = out / TARBALL
    path.write_bytes(buf.getvalue())
    return path, path.stat().st_size, left_out
