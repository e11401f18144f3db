"""Small whole-object reads and writes through any Storage.

Owns: moving a few bytes (lease.json, run.json, sessions.jsonl, a state.json)
to and from a key through a temporary local file, since the Storage protocol
moves files. Must not: know which files these are or what they hold.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from runner.storage import Storage


def read_bytes(storage: Storage, key: str) -> bytes | None:
    """The content at `key`, or None when nothing is there."""
    if not storage.exists(key):
        return None
    with tempfile.TemporaryDirectory(prefix="relay-") as tmp:
        path = Path(tmp) / "blob"
        storage.get(key, path)
        return path.read_bytes()


def write_bytes(storage: Storage, key: str, data: bytes) -> None:
    """Put `data` at `key` (replacing what was there as a whole)."""
    with tempfile.TemporaryDirectory(prefix="relay-") as tmp:
        path = Path(tmp) / key.rsplit("/", 1)[-1]
        path.write_bytes(data)
        storage.put(path, key)
