"""Load test of ``qalign serve`` on loopback: micro-batching on vs off, measured in one run.

    OMP_NUM_THREADS=1 python bench/serve_load.py                     # the tiny test model, built here
    python bench/serve_load.py --policy outputs/qsharp_demo --clients 16 --requests 2 --max-tokens 64

Two servers are started as subprocesses (``python -m qalign.serve``) on the same policy: one with
batching (``--batch-window-ms``), one without (``--no-batching``). Rounds alternate between them, so a
change in the machine's load hits both alike. In a round ``--clients`` concurrent clients each send
``--requests`` completions one after another (same sampling settings, no seed: what batching can merge);
a round has a deadline, and the whole run a time limit, after which it stops by itself.

Every request is accounted for: answered (200), refused with an error (its status and OpenAI error
message are counted), failed in transport, or still unanswered at the round's deadline ("lost"; should
stay 0). Reported per mode: requests/s, p50/p99 latency of the answered requests, the error counts, and
the server's resident memory before the first and after the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Round:
    mode: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost: int = 0

    @property
    def answered(self) -> int:
        return len(self.latencies)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m qalign.serve`` in a subprocess, output in a log file, stopped with SIGTERM."""

    def __init__(self, policy: str, mode: str, extra: list[str], log_dir: Path):
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{mode}.log"
        command = [sys.executable, "-m", "qalign.serve", "--policy", policy, "--port", str(self.port),
                   "--model-name", "bench", "--log-level", "warning", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with self.log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.mode} server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the {self.mode} server did not start in {timeout} s")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST JSON.

    Why not httpx: on this tiny model its connection pool costs more CPU per request than the server does
    (measured: 64 clients through one ``AsyncClient`` sent requests so slowly that the server saw them
    trickle in, 2-5 at a time), which would measure the client instead of the server."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + data)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def run_round(server: Server, clients: int, requests: int, max_tokens: int, deadline_s: float) -> Round:
    """``clients`` concurrent clients × ``requests`` sequential requests; unanswered ones at the deadline are lost."""
    result = Round(server.mode, 0.0)
    pending = clients * requests

    async def client(c: int) -> None:
        nonlocal pending
        connection = Connection("127.0.0.1", server.port)
        try:
            for r in range(requests):
                body = {"model": "bench", "prompt": f"What is {c} + {r}?", "max_tokens": max_tokens,
                        "temperature": 1.0}  # fmt: skip
                start = time.perf_counter()
                try:
                    status, answer = await connection.post("/v1/completions", body)
                except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                    result.errors[f"transport: {type(error).__name__}"] += 1
                    await connection.close()
                    connection = Connection("127.0.0.1", server.port)
                else:
                    if status == 200 and len(answer["choices"]) == 1:
                        result.latencies.append(time.perf_counter() - start)
                    else:
                        result.errors[f"{status}: {answer.get('error', {}).get('message', answer)!s:.60}"] += 1
                pending -= 1
        finally:
            await connection.close()

    start = time.perf_counter()
    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    _, unfinished = await asyncio.wait(tasks, timeout=deadline_s)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    result.seconds = time.perf_counter() - start
    result.lost = pending
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(rounds: list[Round], rss: dict[str, tuple[float, float]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.clients} concurrent clients × {args.requests} requests per round, {args.max_tokens} tokens each, "
        f"{len([r for r in rounds if r.mode == 'batching'])} rounds per mode (alternating)",
        "",
        "| mode | requests | answered | errors | lost | requests/s | p50 latency (s) | p99 latency (s) | RSS before → after (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("batching", "no batching"):
        mine = [r for r in rounds if r.mode == mode]
        if not mine:
            continue
        latencies = [x for r in mine for x in r.latencies]
        answered = sum(r.answered for r in mine)
        errors = sum(sum(r.errors.values()) for r in mine)
        lost = sum(r.lost for r in mine)
        sent = answered + errors + lost
        rps = answered / sum(r.seconds for r in mine)
        before, after = rss[mode]
        lines.append(
            f"| {mode} | {sent} | {answered} | {errors} | {lost} | {rps:.1f} | {statistics.median(latencies):.3f} | "
            f"{percentile(latencies, 0.99):.3f} | {before:.0f} → {after:.0f} |"
        )
    failures = collections.Counter()
    for r in rounds:
        failures.update({f"{r.mode}: {k}": v for k, v in r.errors.items()})
    for reason, count in failures.items():
        lines.append(f"\n- {count} × {reason}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", help="what to serve (default: the tiny test model, built in a temp folder)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="sequential requests per client and round")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--round-deadline", type=float, default=180.0, help="seconds one round may take")
    parser.add_argument("--time-limit", type=float, default=900.0, help="no round starts after this many seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qalign-serve-bench-") as work:
        work = Path(work)
        policy = args.policy
        if policy is None:
            sys.path.insert(0, str(REPO))
            from tests.conftest import build_tiny_model

            policy = str(build_tiny_model(work / "tiny-model"))
        batching = ["--batch-window-ms", str(args.batch_window_ms), "--max-batch-size", str(args.max_batch_size)]
        servers = {
            "batching": Server(policy, "batching", batching, work),
            "no batching": Server(policy, "no batching", ["--no-batching", "--max-batch-size", str(args.max_batch_size)], work),
        }  # fmt: skip
        try:
            for server in servers.values():
                server.wait_ready()
            for server in servers.values():  # one warm-up request each (first-call costs are not load)
                httpx.post(server.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=120)
            rss_before = {mode: rss_mib(server.process.pid) for mode, server in servers.items()}
            rounds: list[Round] = []
            started = time.monotonic()
            for i in range(args.rounds):
                if time.monotonic() - started > args.time_limit:
                    print(f"time limit reached after {i} round pairs", file=sys.stderr)
                    break
                order = list(servers.values()) if i % 2 == 0 else list(servers.values())[::-1]
                for server in order:
                    result = asyncio.run(
                        run_round(server, args.clients, args.requests, args.max_tokens, args.round_deadline)
                    )
                    rounds.append(result)
                    print(
                        f"round {i + 1} {server.mode}: {result.answered} answered, {sum(result.errors.values())} "
                        f"errors, {result.lost} lost in {result.seconds:.1f} s",
                        file=sys.stderr,
                    )
            rss = {mode: (rss_before[mode], rss_mib(server.process.pid)) for mode, server in servers.items()}
        finally:
            codes = {mode: server.stop() for mode, server in servers.items()}
        print(report(rounds, rss, args))
        print(f"\nserver exit codes after SIGTERM: {codes}")


if __name__ == "__main__":
    main()
