"""On-disk embedding cache keyed by (model, text): a killed job resumes without paying twice.

One sqlite file; each row holds a float32 vector. Texts are stored as their SHA-256 only (the cache
can be large, and prompts may be private). Writes are committed per batch, so everything answered
before a crash is kept. WAL mode lets readers and one writer share the file.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """``get_many``/``put_many`` of float32 vectors under (model, text)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Threads of one process share this connection; the lock serialises them.
        self._connection = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._lock = threading.Lock()
        with self._lock, self._connection:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS embeddings ("
                "model TEXT NOT NULL, key BLOB NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL, "
                "PRIMARY KEY (model, key))"
            )

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached vector of each text (``None`` where there is none)."""
        keys = [text_key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # sqlite's limit on bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(
                    f"SELECT key, dim, vector FROM embeddings WHERE model = ? AND key IN ({marks})", [model, *chunk]
                ).fetchall()
                for key, dim, blob in rows:
                    found[bytes(key)] = np.frombuffer(blob, dtype=np.float32, count=dim).copy()
        return [found.get(k) for k in keys]

    def put_many(self, model: str, texts: Sequence[str], vectors: Sequence[np.ndarray]) -> None:
        """Store (and commit) one vector per text."""
        rows = []
        for text, vector in zip(texts, vectors, strict=True):
            array = np.asarray(vector, dtype=np.float32).reshape(-1)
            rows.append((model, text_key(text), int(array.size), array.tobytes()))
        with self._lock, self._connection:
            self._connection.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._connection.close()
