"""A real HTTP proxy on 127.0.0.1 in front of a real server, that misbehaves on cue.

Each POST takes the next action from ``script`` (then ``forward``):
    forward  pass the request (headers and body) to the upstream server and its answer back
    429/503  answer that status without forwarding
    drop     read half the body, then close the socket without answering (a dropped connection)
    hang     hold the request for ``hang_seconds`` (past the client's timeout), then close
    echo     answer 500 with the request's headers in the body (a server that leaks what it got)
Requests are counted per action, so a test can assert how many reached the real server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import requests

from tests.http_stub import serve_locally


class MisbehavingProxy:
    def __init__(self, upstream: str, hang_seconds: float = 3.0):
        self.upstream = upstream.rstrip("/")
        self.hang_seconds = hang_seconds
        self.script: list[str] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                with proxy.lock:
                    action = proxy.script.pop(0) if proxy.script else "forward"
                    proxy.counts[action] += 1
                length = int(self.headers.get("Content-Length", 0))
                if action == "drop":
                    self.rfile.read(length // 2)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(length)
                if action == "hang":
                    time.sleep(proxy.hang_seconds)
                    self.close_connection = True
                    return
                if action in ("429", "503"):
                    self._answer(
                        int(action), json.dumps({"error": {"message": "slow down"}}).encode(), {"Retry-After": "0"}
                    )
                elif action == "echo":
                    self._answer(500, json.dumps({"headers": dict(self.headers)}).encode())
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                    upstream = requests.post(proxy.upstream + self.path, data=body, headers=headers, timeout=120)
                    self._answer(upstream.status_code, upstream.content)

            def _answer(self, status: int, payload: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server, self.url, self._thread = serve_locally(Handler)

    def reset(self, script: list[str] | None = None) -> None:
        with self.lock:
            self.script = list(script or [])
            self.counts = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
