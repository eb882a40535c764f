"""Local server processes: start one on a free port of this machine, wait until it answers, stop it.

Used for vLLM's OpenAI-compatible server, both as rollout worker (``qalign.rollout.vllm_server``) and
as the probe's local embedding server (``qalign.probe.embed_api``). The process gets its own process
group, so stopping it also stops the children it spawned (vLLM's engine core).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qalign.openai_http import ApiClient, ApiError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess in its own process group, its output written to ``log_path``.

    Args:
        command: the command line; the server must listen on ``url``.
        url: where it answers (``http://host:port``).
        env: its whole environment (secrets go here, never on the command line, which ``ps`` shows).
    """

    def __init__(self, command: Sequence[str], url: str, log_path: Path, env: dict[str, str]):
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A new session: stopping the group also stops the server's own child processes.
        self.process = subprocess.Popen(
            list(command), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @classmethod
    def vllm(
        cls, model: str, host: str, port: int, log_path: Path, args: Sequence[str], env: dict[str, str]
    ) -> ServerProcess:
        """vLLM's OpenAI-compatible server for ``model`` on ``host:port``."""
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--host", host, "--port", str(port), *args,
        ]  # fmt: skip
        return cls(command, f"http://{host}:{port}", log_path, env)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the server and its children)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait(timeout)
        else:
            self.kill(signal.SIGKILL)  # reap an orphaned child (vLLM's engine core), if any
        self._log.close()


def healthy(client: ApiClient, timeout: float = 5.0) -> bool:
    """``GET /health`` (vLLM's and TEI's liveness endpoint, at the server root) answers 2xx."""
    try:
        client.get("/health", timeout=timeout, expect_json=False)
    except ApiError:
        return False
    return True


def wait_until_healthy(url: str, timeout: float, process: ServerProcess | None = None) -> None:
    """Block until the server at ``url`` answers /health; raise with its log if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    with ApiClient(url, max_retries=0) as client:  # polled here: a refused connection is not worth a retry
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise RuntimeError(f"server {url} exited during start-up:\n{process.log_tail()}")
            if healthy(client, timeout=2.0):
                return
            time.sleep(1.0)
    tail = process.log_tail() if process else ""
    raise TimeoutError(f"server {url} not healthy after {timeout:.0f}s\n{tail}")
