"""The Storage protocol and `open_storage(url)`.

Owns: the five operations every backend offers and the choice of backend from a
URL. Keys are `/`-separated and relative to the storage root. Nothing above
relies on rename, overwrite or listing order: Google Drive allows two files of
one name, has no atomic rename-over, and a Colab mount writes back late. Every
backend retries transient errors itself and raises StorageError (transient=False)
on permanent ones. Knows nothing of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    url: str
    """Where it points, for messages (never with credentials)."""

    def put(self, local_file: Path, key: str) -> None:
        """Upload a local file to `key`. Afterwards `key` holds exactly that content, once."""

    def get(self, key: str, local_file: Path) -> None:
        """Download `key` to `local_file` (written whole or not at all). Missing key: StorageError."""

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a folder path, with or without trailing /), recursively, in no set order."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def exists(self, key: str) -> bool:
        """Whether `key` holds a file."""
