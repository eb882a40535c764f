"""How often a finished 2-process gloo run aborts at exit ("terminate called without an active exception").

    python bench/exit_abort.py --runs 50 --exit teardown    # leave through the interpreter's teardown
    python bench/exit_abort.py --runs 50 --exit helper      # leave through qalign.distributed.exit_without_teardown
    python bench/exit_abort.py --runs 50 --exit guard       # teardown, with qalign.distributed.guard_interpreter_exit
    python bench/exit_abort.py --runs 20 --pytest tests/test_distributed.py   # any pytest selection, in a loop

Each run starts two processes (``torch.multiprocessing.spawn``) that form a gloo group, train one step of a
small model (FSDP2 ``fully_shard`` or DDP: both issue their gradient collectives from inside ``backward``),
destroy the group and exit. A run counts as aborted when a process dies of SIGABRT after its work is done.

The cause (torch 2.13, found with gdb on the core files of aborted runs): ``torch.autograd.backward`` stashes
a Python object (a ``contextvars`` copy) in the thread-local state for the duration of the backward pass. A
gloo collective issued from a backward hook captures that thread-local state, and gloo's worker thread
often drops the last reference to the finished collective. Dropping it decrefs the Python object, so the
worker must take the GIL. When the main thread has meanwhile begun interpreter finalisation, CPython ends
any non-main thread that asks for the GIL with ``pthread_exit``. That unwinds through the ``noexcept``
destructor, and ``std::terminate`` aborts the process. See ``qalign.distributed.exit_without_teardown``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_one_step(rank: int, port: int, wrapper: str, exit_mode: str) -> None:
    """One process: gloo group, one forward/backward/step, group destroyed, then leave as ``exit_mode`` says."""
    import torch
    import torch.distributed as dist

    from qalign.distributed import exit_without_teardown, guard_interpreter_exit

    if exit_mode == "guard":
        guard_interpreter_exit()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    # The gradient collectives run inside backward. Nothing follows it before the exit: the abort needs the
    # exit to come soon after the last collective, as it does after a final evaluation or a save.
    model(torch.linspace(-1, 1, 12).reshape(2, 6)).sum().backward()
    dist.destroy_process_group()
    if exit_mode == "helper":
        exit_without_teardown(0)


def spawn_runs(runs: int, wrapper: str, exit_mode: str) -> int:
    """``runs`` two-process runs; returns how many ended with a process killed by SIGABRT."""
    import torch.multiprocessing as mp

    aborted = 0
    for _ in range(runs):
        try:
            mp.spawn(train_one_step, args=(free_port(), wrapper, exit_mode), nprocs=2, join=True)
        except mp.ProcessExitedException as error:
            if error.signal_name != "SIGABRT":
                raise
            aborted += 1
    return aborted


def pytest_runs(runs: int, selection: list[str]) -> int:
    """``runs`` runs of a pytest selection in fresh interpreters; returns how many failed."""
    failed = 0
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                                cwd=REPO, capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            failed += 1
            aborts = "terminate called without an active exception" in result.stdout + result.stderr
            print(f"run failed ({'exit abort' if aborts else 'other failure'}): {result.stdout.splitlines()[-1:]}")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--exit", dest="exit_mode", choices=["teardown", "helper", "guard"], default="teardown")
    parser.add_argument("--wrapper", choices=["fsdp2", "ddp"], default="fsdp2")
    parser.add_argument("--pytest", nargs="+", metavar="SELECTION", help="run this pytest selection instead")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    if args.pytest:
        failed = pytest_runs(args.runs, args.pytest)
        what = f"pytest {' '.join(args.pytest)}: {failed}/{args.runs} runs failed"
    else:
        failed = spawn_runs(args.runs, args.wrapper, args.exit_mode)
        what = f"{args.wrapper}, exit={args.exit_mode}: {failed}/{args.runs} runs aborted at exit"
    print(f"{what} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
