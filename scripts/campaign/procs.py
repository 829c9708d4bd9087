"""Runs commands with their output in a log file, under a time limit.

A command over its limit gets SIGINT (Python writes what it has: the report keeps the
rows measured so far, pytest its summary), then SIGKILL after a grace period; each
command runs in its own process group so its children stop with it.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

GRACE_S = 20.0


@dataclasses.dataclass
class Command:
    name: str
    argv: list
    log: Path
    env: Optional[dict] = None  # added to the campaign's environment
    cap_s: Optional[float] = None  # this command's own limit (the step's deadline also holds)


@dataclasses.dataclass
class Outcome:
    name: str
    rc: Optional[int]  # None: never started
    seconds: float
    timed_out: bool
    log: Path

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def _stop(*procs_: subprocess.Popen) -> None:
    """SIGINT to each command's process group, SIGKILL to those still there after
    GRACE_S (all at once: the grace period runs once, not once per command)."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs_ if p.poll() is None]
        for proc in alive:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        stop_at = time.time() + wait
        while any(p.poll() is None for p in alive) and time.time() < stop_at:
            time.sleep(0.1)


def run(commands: list, base_env: dict, cwd: Path, deadline: float, parallel: int = 1,
        say=print) -> list:
    """Runs the commands, at most `parallel` at once, none past `deadline` (time.time());
    returns one Outcome per command, in order."""
    pending, running, done = list(commands), {}, {}
    try:
        _loop(pending, running, done, base_env, cwd, deadline, parallel, say)
    finally:  # interrupted (Ctrl-C, SIGTERM): no command outlives the campaign
        _stop(*(proc for _, proc, _, _, _ in running.values()))
        for _, _, log, _, _ in running.values():
            log.close()
    return [done[c.name] for c in commands]


def _loop(pending, running, done, base_env, cwd, deadline, parallel, say) -> None:
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            left = deadline - time.time()
            if left <= 5:
                done[cmd.name] = Outcome(cmd.name, None, 0.0, True, cmd.log)
                say(f"  {cmd.name}: not started, the step's time is up")
                continue
            cmd.log.parent.mkdir(parents=True, exist_ok=True)
            limit = min(left, cmd.cap_s or left)
            shown = " ".join(a if len(a) < 80 else a[:60] + "..." for a in map(str, cmd.argv))
            say(f"  {cmd.name}: {shown}  (limit {limit:.0f} s, log {cmd.log.name})")
            log = open(cmd.log, "w")
            log.write(f"$ {' '.join(map(str, cmd.argv))}\n")
            log.flush()
            env = {**base_env, **(cmd.env or {})}
            # its own process group (to stop it with its children), in our session (so a
            # machine that ends the campaign's session ends it too)
            proc = subprocess.Popen([str(a) for a in cmd.argv], cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
            running[cmd.name] = (cmd, proc, log, time.time(), time.time() + limit)
        time.sleep(0.2)
        now = time.time()
        expired = {name for name, (_, proc, _, _, stop_at) in running.items()
                   if proc.poll() is None and now >= stop_at}
        if expired:  # stopped together: one grace period for all of them
            say(f"  {', '.join(sorted(expired))}: over the limit, stopping (SIGINT, then "
                "SIGKILL)")
            _stop(*(running[name][1] for name in expired))
        for name, (cmd, proc, log, start, _stop_at) in list(running.items()):
            timed_out = name in expired
            if proc.poll() is None:
                continue
            log.write(f"\n[campaign] exit status {proc.returncode}"
                      f"{', stopped at its time limit' if timed_out else ''}, "
                      f"{time.time() - start:.1f} s\n")
            log.close()
            done[name] = Outcome(name, proc.returncode, time.time() - start, timed_out, cmd.log)
            del running[name]
            state = "timed out" if timed_out else f"exit {proc.returncode}"
            say(f"  {name}: {state} after {done[name].seconds:.1f} s")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_words(path: Path) -> str:
    """The command's last line of output (the campaign's own exit line skipped)."""
    lines = [line for line in tail(path, 40).splitlines()
             if line.strip() and not line.startswith("[campaign]")]
    return lines[-1].strip() if lines else "no output"
