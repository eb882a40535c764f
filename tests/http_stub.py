"""A real HTTP server on 127.0.0.1 that answers each ``"METHOD /path"`` as a test scripts it.

Stands in for an OpenAI-compatible server (or vLLM's extra endpoints) where starting the real one would
test nothing more: the client under test still opens sockets, sends headers and reads real answers.
Every request is recorded, so a test can assert how many were sent where and what they carried.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve_locally(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str, threading.Thread]:
    """``handler`` served on a free port of 127.0.0.1 from a daemon thread → (server, its URL, the thread)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", thread


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict or list: JSON; str: plain text; None: empty
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (past a client's timeout: a hung server)
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Route = list[Reply] | Callable[[Any], Reply]


class StubServer:
    """``routes["POST /v1/completions"]``: a list of replies (each request takes the next; the last one
    repeats) or a function of the request's JSON body. Unrouted paths answer 404, as vLLM does."""

    def __init__(self, routes: dict[str, Route] | None = None):
        self.routes: dict[str, Route] = dict(routes or {})
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                self._serve()

            def do_POST(self):
                self._serve()

            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw) if raw else None
                key = f"{self.command} {self.path}"
                with stub.lock:
                    stub.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                    route = stub.routes.get(key)
                    if route is None:
                        reply = Reply(404, {"detail": "Not Found"})
                    elif callable(route):
                        reply = route(body)
                    else:
                        reply = route.pop(0) if len(route) > 1 else route[0]
                time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(reply.body, (dict, list)):
                    payload, kind = json.dumps(reply.body).encode(), "application/json"
                else:
                    payload, kind = (reply.body or "").encode(), "text/plain; charset=utf-8"
                self.send_response(reply.status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server, self.url, self._thread = serve_locally(Handler)

    def count(self, key: str) -> int:
        """Requests seen for ``"METHOD /path"``."""
        with self.lock:
            return sum(f"{s.method} {s.path}" == key for s in self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
