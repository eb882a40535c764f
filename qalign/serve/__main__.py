"""``python -m qalign.serve`` (``qalign serve``): serve a saved policy over an OpenAI-compatible API.

    python -m qalign.serve --policy outputs/qsharp_demo --port 8000 [--host 127.0.0.1] [--model-name NAME]
        [--api-key-env NAME] [--batch-window-ms 5] [--max-batch-size 32] [--no-batching]
        [--backend hf|vllm] [--dtype float32|bfloat16|float16] [--seed N] [--log-level info]

Every argument is checked before a model is loaded (that takes seconds to minutes): a mistake ends the
command at once with one line ``qalign: …`` on stderr and exit status 2. The API key is read from the
environment variable named by ``--api-key-env`` (never from the command line, which ``ps`` shows), and no
log line names more than the variable.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import sys
from typing import NoReturn

logger = logging.getLogger("qalign.serve")

DTYPES = ("float32", "bfloat16", "float16", "auto")


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"qalign: {message}", file=sys.stderr)
    sys.exit(status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        fail(f"serve: {message} (see `qalign serve --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qalign serve",
        description="Serve a qalign policy (model folder, hub id, LoRA adapter, Q# or Q-probe output folder) "
        "over an OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.",
    )
    parser.add_argument("--policy", required=True, help="model folder, hub id, LoRA adapter, Q# or Q-probe folder")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: --policy)")
    parser.add_argument("--api-key-env", help="name of the environment variable holding the API key to require")
    parser.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long a request waits to share a policy call (ms)"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="most prompts in one policy call")
    parser.add_argument("--no-batching", action="store_true", help="one policy call per request (window 0)")
    parser.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        help="engine of every policy kind (Q#: the value model runs in vLLM's sampler)",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the loader's, float32)")
    parser.add_argument("--seed", type=int, help="engine seed for unseeded requests")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """Exit 2 on any argument that cannot work; returns the API key (None: no key required).

    Only cheap checks: whether the policy folder exists and is a kind qalign loads (no torch import),
    the ranges, the key's variable, and whether the port is free."""
    from qalign.policies import PolicyError, policy_kind

    try:
        args.kind = policy_kind(args.policy)
    except PolicyError as error:
        fail(str(error))
    if not 1 <= args.port <= 65535:
        fail(f"--port must be in 1..65535, got {args.port}")
    if not math.isfinite(args.batch_window_ms) or args.batch_window_ms < 0:
        fail(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    if args.max_batch_size < 1:
        fail(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.model_name is not None and not args.model_name.strip():
        fail("--model-name must not be empty")
    api_key = None
    if args.api_key_env is not None:
        from qalign.openai_http import ApiError, secret_from_env

        if not args.api_key_env:
            fail("--api-key-env needs the name of an environment variable")
        try:
            api_key = secret_from_env(args.api_key_env, "--api-key-env").reveal()
        except ApiError as error:
            fail(str(error))
    check_port(args.host, args.port)
    return api_key


def check_port(host: str, port: int) -> None:
    """Fail now, not after loading the model, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        fail(f"--host {host!r}: {error.strerror}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as error:
            fail(f"cannot listen on {host}:{port}: {error.strerror or error}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    api_key = check_args(args)
    window = 0.0 if args.no_batching else args.batch_window_ms
    name = args.model_name or args.policy
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s qalign serve: %(message)s")

    logger.info("loading %s policy %s", args.kind, args.policy)
    from qalign.policies import load_policy

    overrides = {"backend": args.backend, "dtype": args.dtype, "seed": args.seed}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        # One micro-batch is one engine batch: the HF engine would otherwise split it into its own batches.
        policy = load_policy(args.policy, batch_size=args.max_batch_size, **overrides)
    except Exception as error:
        fail(f"cannot load policy {args.policy!r}: {type(error).__name__}: {error}", status=1)
    try:
        import uvicorn

        from qalign.serve.app import build_app

        try:
            app = build_app(policy, name, api_key, batch_window_ms=window, max_batch_size=args.max_batch_size)
        except ValueError as error:
            fail(f"cannot serve policy {args.policy!r}: {error}", status=1)
        batching = f"window {window:g} ms, up to {args.max_batch_size} prompts" if window > 0 else "off"
        key_note = f"required (from ${args.api_key_env})" if api_key else "none"
        logger.info(
            "serving %r on http://%s:%d/v1 (batching: %s; API key: %s)", name, args.host, args.port, batching, key_note
        )
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: as
        # KeyboardInterrupt / _Stopped here, so that the policy is closed (engine processes stopped) and the
        # command exits 0, instead of being killed by the default SIGTERM action before ``finally``.
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        try:
            uvicorn.Server(config).run()
        except (KeyboardInterrupt, _Stopped):
            logger.info("stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        policy.close()


class _Stopped(Exception):
    """SIGTERM, raised in the main thread once uvicorn has finished its graceful shutdown."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped


if __name__ == "__main__":
    main()
