"""The Storage protocol and `open_storage(url)`.

Owns: the five operations every backend offers and the choice of backend from a
URL. Keys are `/`-separated and relative to the storage root. Nothing above
relies on rename, overwrite or listing order: Google Drive allows two files of
one name, has no atomic rename-over, and a Colab mount writes back late. Every
backend retries transient errors itself and raises StorageError (transient=False)
on permanent ones. Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable


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


# ---------------------------------------------------------------- optional capabilities
# A backend may offer more than the five operations; the layers above ask `capability(storage, KIND)` once
# per use, never probe for method names themselves. Declared here so every backend and caller agree.


class AtomicFolders(Protocol):
    """Multi-file commits that land whole (the Hub): a folder's files and its COMMIT.json arrive together, and
    a folder is deleted in one commit, never half."""

    def commit_folder(self, local_dir: Path, key_prefix: str, names: list[str]) -> None: ...

    def delete_folder(self, key_prefix: str) -> None: ...


class CompareAndSwap(Protocol):
    """Conditional writes (the Hub's parent_commit): one key updated only if unchanged since it was read, and
    every later commit fenced on a check of the lease key's content (None: no fence)."""

    def update_if_unchanged(self, key: str, decide: Callable[[bytes | None], bytes | None]) -> bytes | None: ...

    def fence(self, lease_key: str, check: Callable[[bytes | None], None] | None) -> None: ...


class WritesBackLate(Protocol):
    """A store that acknowledges writes before they are safe (the Colab Drive mount): flush() pushes them."""

    def flush(self) -> None: ...


Capability = TypeVar("Capability")


def capability(storage: Storage, kind: type[Capability]) -> Capability | None:
    """`storage` as `kind` (one of the protocols above) when it offers every method of it, else None.

    Looked up with getattr, not isinstance: wrappers (runner.storage.fenced, the tests' fault injectors)
    forward attributes through __getattr__, which Python 3.12's runtime protocol checks do not see."""
    methods = [name for name, value in vars(kind).items() if callable(value) and not name.startswith("_")]
    return storage if all(callable(getattr(storage, name, None)) for name in methods) else None  # type: ignore[return-value]
