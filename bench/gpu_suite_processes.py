"""Running one GPU-suite measurement as a child process and stopping it, with every process it started.

A measurement runs in its own session and is stopped as a whole tree: an ``accelerate launch`` or a vLLM engine
leaves workers behind that a kill of the parent alone would not reach. ``bench/gpu_suite.py`` is the driver.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

EXIT_GRACE_S = 15  # once a measurement has written its results, it gets this long to exit (vLLM's teardown)


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc), so that a timed-out launch's workers go too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process, its group and its descendants; SIGKILL what is left 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = process_tree(process.pid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=10)
            if sig == signal.SIGTERM and all(not Path(f"/proc/{pid}").exists() for pid in pids[1:]):
                return
        except subprocess.TimeoutExpired:
            pass


def run_step(cmd: list[str], env: dict, timeout: float, log: Path, result: Path, cwd: Path) -> tuple[int | None, float]:
    """Run one measurement in ``cwd``, its output in ``log``; (exit status, or None when it was stopped, and
    seconds until its results)."""
    start = time.monotonic()
    deadline, written = start + timeout, None
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(cmd)}\n\n")
        handle.flush()
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        while True:
            try:
                return process.wait(timeout=1), time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            if written is None and result.exists():
                written = time.monotonic()
                deadline = min(deadline, written + EXIT_GRACE_S)
            if time.monotonic() >= deadline:
                stop(process)
                handle.write(f"\n[gpu_suite] stopped after {time.monotonic() - start:.0f} s\n")
                return None, (written or time.monotonic()) - start


def log_tail(log: Path, lines: int = 3) -> str:
    """The last non-blank lines of a measurement's log, joined on one line: why it failed, for the report."""
    try:
        text = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-400:]
