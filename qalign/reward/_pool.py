"""A small pool of reusable math-verify worker processes with hard deadlines.

Why processes: sympy can run for hours on inputs like ``9^{9^{9^{9}}}``, and
math-verify's own timeout uses ``signal.alarm``, which only works on the main
thread, while TRL may call reward functions from anywhere. Killing a process
is the only reliable way to stop a runaway computation (big-integer maths
holds the GIL, so no in-process timer can interrupt it).

Why ``subprocess`` and not ``multiprocessing``: the worker must start from a
fresh interpreter, never ``fork`` (the parent has torch threads). A plain
``python _mv_worker.py`` child is that, like the "spawn" start method, but
without spawn's side effects: spawn re-imports the parent's ``__main__`` in
the child (re-running a training script that lacks an ``if __name__ ==
"__main__"`` guard) and imports the whole ``qalign`` package to unpickle the
target function. Here the child imports only math-verify.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

_WORKER_SCRIPT = str(Path(__file__).with_name("_mv_worker.py"))

# Importing sympy + math-verify takes ~1 s on an idle machine; allow for a
# heavily loaded one. Start-up is not charged to the per-comparison timeout,
# otherwise the first batch of a run would be scored 0 spuriously.
STARTUP_TIMEOUT_S = 120.0


class WorkerTimeout(Exception):
    """The comparison did not finish before its deadline; the worker was killed."""


class WorkerError(Exception):
    """The worker process failed: it could not start, crashed or was killed."""


class ComparisonError(Exception):
    """math-verify raised inside a healthy worker (which stays in the pool)."""


def default_num_workers() -> int:
    # Few processes: most answers are decided by the sympy-free fast path and
    # each worker holds ~100 MB of sympy/ANTLR state.
    return max(1, min(4, os.cpu_count() or 1))


class _Worker:
    """One child process; used by one thread at a time (the pool ensures it)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: we poll() the raw fd ourselves
            close_fds=True,
        )
        self._buf = bytearray()
        self.ready = False

    def _read_line(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # poll, not select: fds can exceed 1024 in big jobs
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000.0):
                raise WorkerTimeout()
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.poll()
                raise WorkerError(f"math-verify worker exited (return code {code})")
            self._buf += chunk

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # an unbuffered pipe write may be partial
            written = self.proc.stdin.write(view)
            view = view[written:]

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            line = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        except WorkerTimeout:
            raise WorkerError(f"math-verify worker did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
        if json.loads(line) != {"ready": True}:
            raise WorkerError(f"unexpected start-up message from math-verify worker: {line[:200]!r}")
        self.ready = True

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        self.wait_ready()
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n"
        try:
            self._write(request.encode("ascii"))
        except (BrokenPipeError, ValueError) as exc:  # died while idle / pipe closed
            raise WorkerError(f"math-verify worker is gone: {exc}") from exc
        reply = json.loads(self._read_line(time.monotonic() + timeout))
        if not reply.get("ok"):
            raise ComparisonError(reply.get("error", "unknown error"))
        return bool(reply["equal"])

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class WorkerPool:
    """Hands each caller an idle worker, creating up to ``max_workers`` lazily.

    Thread-safe. A worker that timed out or broke is killed and replaced by a
    fresh one (started right away, so it is warming up while callers continue).
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or default_num_workers()
        self._idle: list[_Worker] = []
        self._count = 0  # idle + busy workers
        self._cond = threading.Condition()
        self._closed = False
        self.pid = os.getpid()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise WorkerError("math-verify worker pool is shut down")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.proc.poll() is None:
                        return worker
                    # Died while idle (e.g. the OOM killer): drop it, so a
                    # request is never sent to a dead process.
                    worker.kill()
                    self._count -= 1
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return _Worker()  # Popen outside the lock: it forks/execs
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
            worker = None
            if not self._closed:
                try:
                    worker = _Worker()
                except OSError:
                    pass
        with self._cond:
            if worker is None:
                self._count -= 1
            elif self._closed:
                worker.kill()
                self._count -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        """math-verify's verdict on (gold, pred).

        Raises WorkerTimeout, WorkerError or ComparisonError; the caller
        decides how to score those.
        """
        worker = self._acquire()
        healthy = False
        try:
            verdict = worker.compare(gold, pred, timeout)
            healthy = True
            return verdict
        except ComparisonError:
            healthy = True  # math-verify raised, but the process is fine
            raise
        except (OSError, ValueError) as exc:  # broken pipe, garbled reply
            raise WorkerError(f"math-verify worker failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._release(worker, healthy)

    def warm_up(self, num_workers: int = 1) -> None:
        """Start ``num_workers`` workers and wait until they can take requests."""
        workers = [self._acquire() for _ in range(min(num_workers, self.max_workers))]
        ok = [False] * len(workers)
        try:
            for i, worker in enumerate(workers):
                worker.wait_ready()
                ok[i] = True
        finally:
            for worker, healthy in zip(workers, ok):
                self._release(worker, healthy)

    def shutdown(self) -> None:
        if os.getpid() != self.pid:
            return  # inherited through fork: these workers belong to the parent
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            worker.kill()


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> WorkerPool:
    """The process-wide pool, created on first use.

    Re-created in a forked child: the parent's workers are wired to the
    parent's pipes and must not be shared.
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = WorkerPool()
            atexit.register(_pool.shutdown)
        return _pool


def shutdown_pool() -> None:
    """Kill all idle workers (busy ones are killed when their caller returns)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown()
