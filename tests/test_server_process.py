"""Local server processes, with a small Python HTTP server as the process (vLLM itself is started the
same way in tests/rollout/test_vllm_server.py and tests/probe/test_api_embedder.py)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from qalign.server_process import ServerProcess, free_port, wait_until_healthy

# Serves /health after ``delay`` seconds; starts a child process first, as vLLM starts its engine core.
SERVER = """
import http.server, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(float(sys.argv[2]))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def start(tmp_path, delay: float = 0.0, script: str = SERVER) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-c", script, str(port), str(delay)]
    return ServerProcess(command, f"http://127.0.0.1:{port}", tmp_path / "server.log", dict(os.environ))


def child_pid(process: ServerProcess) -> int:
    for _ in range(100):
        if "child" in process.log_tail():
            return int(process.log_tail().split()[1])
        time.sleep(0.1)
    raise AssertionError(f"no child pid in the log: {process.log_tail()!r}")


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie (a container's init may never reap it)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_waits_until_healthy_and_stop_ends_the_whole_group(tmp_path):
    process = start(tmp_path, delay=1.5)
    try:
        child = child_pid(process)
        wait_until_healthy(process.url, 30, process)
        assert process.alive()
    finally:
        process.stop()
    assert not process.alive()
    for _ in range(50):  # the child gets the signal too; it may take a moment to end
        if gone(child):
            break
        time.sleep(0.1)
    assert gone(child), "stopping the server must also stop the processes it started"


def test_a_server_that_dies_during_start_up_raises_with_its_log(tmp_path):
    process = start(tmp_path, script="import sys; print('no GPU found for model xyz'); sys.exit(3)")
    try:
        with pytest.raises(RuntimeError, match=r"exited during start-up:\n.*no GPU found for model xyz"):
            wait_until_healthy(process.url, 30, process)
    finally:
        process.stop()


def test_a_server_that_never_answers_times_out(tmp_path):
    process = start(tmp_path, delay=60)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"{process.url} not healthy after 2s"):
            wait_until_healthy(process.url, 2, process)
        assert time.monotonic() - started < 10
        assert process.alive()
    finally:
        process.stop()
    assert not process.alive()
