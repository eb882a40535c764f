"""A fake Hugging Face Hub: a real HTTP server on 127.0.0.1 with the endpoints a ``Trainer`` push calls.

``huggingface_hub`` (the installed client, unchanged) talks to it over sockets as it would to the Hub:

* ``POST /api/repos/create``: create ``namespace/name`` (409, with the repo's url, when it exists);
* ``POST /api/validate-yaml``: the check of a README.md's metadata before it is uploaded (here: the front
  matter must be a YAML mapping);
* ``POST /api/models/{repo}/preupload/{revision}``: the upload mode of each file. Always ``regular``, so
  the files travel base64-encoded inside the commit: the real Hub sends large and binary files through
  LFS/Xet storage instead, a separate service this server does not imitate;
* ``POST /api/models/{repo}/commit/{revision}``: an NDJSON commit (a header line, then one line per added
  or deleted file), applied to the repo's files.

``GET /api/agent-harnesses``, the registry the client fetches once a day for its user agent (best effort),
answers 404: the client then detects no agent and caches nothing.

Writes need a bearer token (any), as on the Hub. The committed files stay in memory: ``files(repo)``
returns them and ``download(repo, folder)`` writes them out, the folder a download of the repo would give.
Anything else answers 404 and is kept in ``unknown`` for the test to assert on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.http_stub import serve_locally

USER = "qalign-tester"  # whose namespace a repo id without one lands in
ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<revision>[^/?]+)")


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id → path in repo → content
        self.commits: dict[str, list[str]] = {}  # repo id → commit summaries, oldest first
        self.unknown: list[str] = []  # "METHOD /path" of requests no endpoint here answers
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Hub's servers do

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                with hub.lock:
                    status, answer = hub.answer(self.path, body)
                self.reply(status, answer)

            def do_GET(self) -> None:
                if self.path != "/api/agent-harnesses":
                    with hub.lock:
                        hub.unknown.append(f"GET {self.path}")
                self.reply(404, {"error": "not served by the fake hub"})

            def reply(self, status: int, answer: dict[str, Any]) -> None:
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server, self.url, self._thread = serve_locally(Handler)

    # ------------------------------------------------------------------ the endpoints

    def answer(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization') or USER}/{request['name']}"
            url = {"url": f"{self.url}/{repo}", "name": repo}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", **url}
            self.repos[repo], self.commits[repo] = {}, []
            return 200, url
        if path == "/api/validate-yaml":
            return validate_card(json.loads(body)["content"])
        match = ROUTE.match(path)
        if match is None:
            self.unknown.append(f"POST {path}")
            return 404, {"error": "not served by the fake hub"}
        repo = match["repo"]
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}  # fmt: skip
        return self.commit(repo, [json.loads(line) for line in body.splitlines() if line.strip()])

    def commit(self, repo: str, lines: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        files, summary = self.repos[repo], ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            else:  # lfsFile, copy: never asked for, since every upload mode given out is "regular"
                return 400, {"error": f"the fake hub does not take {key!r} operations"}
        self.commits[repo].append(summary)
        oid = hashlib.sha1(f"{repo}:{len(self.commits[repo])}".encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}

    # ------------------------------------------------------------------ what the test reads back

    def files(self, repo: str) -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo])

    def download(self, repo: str, folder: str | Path) -> Path:
        """Write the repo's files under ``folder``, as a download of it would lay them out."""
        folder = Path(folder)
        for path, content in self.files(repo).items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        return folder

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def validate_card(text: str) -> tuple[int, dict[str, Any]]:
    """The Hub refuses a README.md whose front matter is not a YAML mapping (400 with the errors)."""
    import yaml

    if not text.startswith("---\n"):
        return 200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
    try:
        metadata = yaml.safe_load(text.split("---\n")[1])
    except yaml.YAMLError as error:
        return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}
    if not isinstance(metadata, dict):
        return 400, {"errors": [{"message": "metadata must be a mapping"}]}
    return 200, {"warnings": []}
