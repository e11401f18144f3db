"""A storage whose writes are fenced by the run's lease: no write once this session may not write.

Owns: `FencedStorage`, a wrapper that asks `check()` (Lease.assert_held) right before every write
(put, delete, and the Hub's commit_folder / delete_folder) and passes reads through untouched. A
session hands it to the checkpoint manager and the folder store, so a trainer that lost the run
commits no checkpoint, deletes no folder and writes no final/.

Must not: know what the check reads (a lease token on a folder or Drive; only local state on the
Hub, whose commits are conditional themselves); retry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.storage import Storage


class FencedStorage:
    """`storage` with `check()` asked before each write; every other attribute is the storage's own."""

    def __init__(self, storage: Storage, check: Callable[[], None]) -> None:
        self._storage = storage
        self._check = check
        self.url = storage.url

    def __repr__(self) -> str:
        return f"FencedStorage({self._storage!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if name in ("commit_folder", "delete_folder") and callable(attr):
            return self._fenced(attr)
        return attr

    def _fenced(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def fenced(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return write(*args, **kwargs)

        return fenced

    def put(self, local_file: Path, key: str) -> None:
        self._check()
        self._storage.put(local_file, key)

    def delete(self, key: str) -> None:
        self._check()
        self._storage.delete(key)

    def get(self, key: str, local_file: Path) -> None:
        self._storage.get(key, local_file)

    def list(self, prefix: str) -> list[str]:
        return self._storage.list(prefix)

    def exists(self, key: str) -> bool:
        return self._storage.exists(key)
