"""Places a GPU campaign's gpu-results.tar.gz in the repository.

    python scripts/ingest_gpu_results.py TARBALL... [--dest ROOT] [--force]

From each tarball (in order; a later one replaces what an earlier one placed):
  report/<suite>/...   -> reports/<gpu>/<suite>/      (CSV, charts, summary of the report)
  bench/results.csv    -> reports/<gpu>/bench.csv     (the PERF suite, every baseline)
  bench/...            -> reports/<gpu>/bench/        (its charts, summary, short table)
  tune/<gpu>.json      -> autotune/tables/<gpu>.json  (the shipped tuned table)
  everything else      -> reports/<gpu>/campaign/     (machine.json, summary.md, logs)
<gpu> is the GPU's slug from machine.json (cpu-rehearsal for a rehearsal). Results made
from other kernel sources than this checkout's (machine.json's kernels_hash) are refused
unless --force: their numbers and table describe other code. A rehearsal tarball is
refused for this checkout itself (it holds no GPU numbers) unless --dest or --force.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign.machine import kernels_hash  # noqa: E402
from campaign.pack import TOP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Refused(Exception):
    """The tarball is not ingested; the message says why."""


def destination(rel: PurePosixPath, slug: str) -> PurePosixPath:
    """Where a file of the tarball (path below gpu-results/) goes, relative to the root."""
    parts = rel.parts
    reports = PurePosixPath("reports", slug)
    if parts[0] == "report" and len(parts) > 2:
        return reports.joinpath(*parts[1:])
    if parts[0] == "bench" and len(parts) == 2 and parts[1] == "results.csv":
        return reports / "bench.csv"
    if parts[0] == "bench":
        return reports.joinpath(*parts)
    if parts[0] == "tune" and len(parts) == 2 and rel.suffix == ".json":
        return PurePosixPath("autotune", "tables", parts[1])
    return reports.joinpath("campaign", *parts)


def _members(tar: tarfile.TarFile) -> dict:
    """{path below gpu-results/: member} of the regular files; unsafe paths refused."""
    files = {}
    for m in tar.getmembers():
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or path.parts[:1] != (TOP,):
            raise Refused(f"unexpected path in the tarball: {m.name!r}")
        if m.isfile() and len(path.parts) > 1:
            files[PurePosixPath(*path.parts[1:])] = m
        elif not (m.isdir() or m.isfile()):
            raise Refused(f"not a plain file in the tarball: {m.name!r}")
    return files


def ingest(tarball: Path, dest: Path, force: bool = False, to_checkout: bool = False,
           say=print) -> list:
    """Places the tarball's files under dest; returns the paths written."""
    with tarfile.open(tarball, "r:gz") as tar:
        files = _members(tar)
        if PurePosixPath("machine.json") not in files:
            raise Refused(f"{tarball}: no machine.json: not a campaign tarball")
        info = json.load(tar.extractfile(files[PurePosixPath("machine.json")]))
        rehearsal = info.get("mode") == "rehearsal"
        if rehearsal and to_checkout and not force:
            raise Refused(f"{tarball} is a CPU rehearsal (no GPU numbers): ingest it with "
                          "--dest somewhere else, or --force")
        ours, theirs = kernels_hash(REPO / "kernels"), info.get("kernels_hash")
        if theirs != ours:
            why = (f"{tarball} was made from other kernel sources (kernels_hash "
                   f"{str(theirs)[:12]}, commit {info.get('git_commit') or 'unknown'}) than "
                   f"this checkout's ({ours[:12]}): its timings and tuned table describe other "
                   "code, and attend would ignore the table as stale")
            if not force:
                raise Refused(why + ". Re-run the campaign on this checkout, or pass --force.")
            say(f"warning: {why}; ingesting anyway (--force)")
        slug = "cpu-rehearsal" if rehearsal else (info.get("gpu_slug") or "unknown-gpu")
        written = []
        for rel, member in sorted(files.items()):
            target = dest / destination(rel, slug)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written.append(target)
    say(f"{tarball}: {len(written)} files for {info.get('gpu') or 'a CPU rehearsal'} "
        f"placed under {dest} (reports/{slug}/, autotune/tables/)")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/ingest_gpu_results.py",
                                description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tarballs", nargs="+", type=Path, metavar="TARBALL")
    p.add_argument("--dest", type=Path, default=None,
                   help="root to place the files under (default: this checkout)")
    p.add_argument("--force", action="store_true",
                   help="ingest results made from other kernel sources, or a rehearsal here")
    args = p.parse_args(argv)
    dest = (args.dest or REPO).resolve()
    try:
        for tarball in args.tarballs:
            for path in ingest(tarball, dest, args.force, to_checkout=dest == REPO):
                print(f"  {path.relative_to(dest)}")
    except (Refused, OSError, tarfile.TarError, ValueError) as e:
        print(f"ingest refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
