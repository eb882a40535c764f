"""``python -m qalign.serve`` / ``qalign serve``: arguments checked before any model loads (one ``qalign:``
line, exit 2), and a real run in a subprocess behind an API key that no output line ever shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from qalign.serve.__main__ import main
from qalign.server_process import free_port
from tests.serve.conftest import client

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: bad arguments must end the command first."""
    import qalign.policies

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded despite bad arguments")

    monkeypatch.setattr(qalign.policies, "load_policy", refuse)


def fails_with(capsys, argv: list[str], words: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qalign: ") and words in err, err


def test_bad_arguments_exit_2_before_loading(no_loading, capsys, tiny_model_dir, tmp_path, monkeypatch):
    ok = ["--policy", str(tiny_model_dir), "--port", str(free_port())]
    fails_with(capsys, ["--policy", str(tmp_path / "missing"), "--port", "8000"], "no such folder")
    fails_with(capsys, ["--policy", "./outputs/not_there", "--port", "8000"], "no such folder")
    fails_with(capsys, ["--policy", str(tmp_path), "--port", "8000"], "none of the folders qalign loads")
    fails_with(capsys, ["--policy", str(tiny_model_dir)], "--port")
    fails_with(capsys, ["--port", "8000"], "--policy")
    fails_with(capsys, [*ok[:2], "--port", "70000"], "1..65535")
    fails_with(capsys, [*ok[:2], "--port", "eighty"], "invalid int value")
    fails_with(capsys, [*ok, "--batch-window-ms", "-1"], "--batch-window-ms")
    fails_with(capsys, [*ok, "--batch-window-ms", "nan"], "--batch-window-ms")
    fails_with(capsys, [*ok, "--max-batch-size", "0"], "--max-batch-size")
    fails_with(capsys, [*ok, "--backend", "tgi"], "invalid choice")
    fails_with(capsys, [*ok, "--dtype", "int3"], "invalid choice")
    fails_with(capsys, [*ok, "--model-name", " "], "--model-name")
    monkeypatch.delenv("QALIGN_SERVE_NO_SUCH_KEY", raising=False)
    fails_with(capsys, [*ok, "--api-key-env", "QALIGN_SERVE_NO_SUCH_KEY"], "QALIGN_SERVE_NO_SUCH_KEY is not set")
    monkeypatch.setenv("QALIGN_SERVE_EMPTY_KEY", "  ")
    fails_with(capsys, [*ok, "--api-key-env", "QALIGN_SERVE_EMPTY_KEY"], "QALIGN_SERVE_EMPTY_KEY is not set")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails_with(capsys, ["--policy", str(tiny_model_dir), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")


def test_help_and_the_qalign_command():
    from qalign.cli import COMMANDS, SUMMARIES, usage

    assert COMMANDS["serve"] == "qalign.serve.__main__" and "OpenAI" in SUMMARIES["serve"]
    assert "  serve " in usage()
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0


def test_serve_command_end_to_end_with_a_key(tiny_model_dir, tmp_path):
    key = f"sk-cli-{uuid.uuid4().hex}"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QALIGN_SERVE_TEST_KEY": key}
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "qalign.cli", "serve", "--policy", str(tiny_model_dir), "--port", str(port),
               "--model-name", "tiny", "--api-key-env", "QALIGN_SERVE_TEST_KEY", "--batch-window-ms", "2"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up:\n" + log.read_text()
            time.sleep(0.3)
        assert httpx.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 401
        api = client(base + "/v1", api_key=key)
        first = api.completions.create(model="tiny", prompt="What is 3 + 4?", max_tokens=5, seed=2)
        again = api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is 3 + 4?"}], max_tokens=5, seed=2
        )
        assert first.usage.completion_tokens == 5 and again.choices[0].message.content == first.choices[0].text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, log.read_text()
    output = log.read_text()
    assert (
        "serving 'tiny' on http://127.0.0.1:" in output and "API key: required (from $QALIGN_SERVE_TEST_KEY)" in output
    )
    assert '"POST /v1/completions HTTP/1.1" 401' in output and '"POST /v1/completions HTTP/1.1" 200' in output
    assert key not in output
