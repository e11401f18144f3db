"""Committed folders of a run other than checkpoints: the latent cache, the compile cache, final/.

Owns: RUN/NAME/ folders that are written whole, once, with the same commit
protocol as checkpoints (manifest.py: files first, COMMIT.json last), and their
local copies in WORKDIR/NAME/. A local copy counts only when it verifies against
its own COMMIT.json, so a folder half-written by a killed process is rebuilt.

Must not: know what the folders hold (the caller fills them) or import torch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from runner import events
from runner.checkpoint.manifest import COMMIT, commit_folder, fetch_folder, verify_dir, write_manifest
from runner.errors import CheckpointCorrupt, StorageError
from runner.storage import Storage

COMPILE_CACHE_FILE = "artifacts.bin"

Fill = Callable[[Path], object]
"""Writes a folder's files into the (empty) local folder it is given."""


class FolderStore:
    """The committed folders of one run, by name relative to the run ("cache/FP", "compile-cache/KEY", "final")."""

    def __init__(self, storage: Storage, run: str, workdir: Path) -> None:
        self.storage, self.run, self.workdir = storage, run, Path(workdir)

    def local(self, name: str) -> Path:
        return self.workdir / name

    def prefix(self, name: str) -> str:
        return f"{self.run}/{name}"

    def is_committed(self, name: str) -> bool:
        """Whether storage holds the folder's COMMIT.json (its files are verified when fetched)."""
        return self.storage.exists(f"{self.prefix(name)}/{COMMIT}")

    def is_local(self, name: str) -> bool:
        """Whether the local copy is complete: its COMMIT.json lists every file and each one matches."""
        return verified_locally(self.local(name))

    def fetch(self, name: str) -> Path:
        """The local copy, verified: kept when it verifies, else downloaded. CheckpointCorrupt when storage
        holds no committed folder of that name or its files do not match their COMMIT.json."""
        local = self.local(name)
        if not self.is_local(name):
            fetch_folder(self.storage, self.prefix(name), local)
        return local

    def build(self, name: str, fill: Fill, meta: dict) -> Path:
        """A fresh local copy: emptied, filled by `fill`, then its COMMIT.json written last."""
        local = self.local(name)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        fill(local)
        write_manifest(local, meta)
        return local

    def commit(self, name: str, *, replace: bool = False) -> None:
        """Upload the local copy. `replace`: first uncommit a stored copy of that name, so no reader takes
        a mix of old and new files for a committed folder."""
        if replace and self.is_committed(name):
            self.storage.delete(f"{self.prefix(name)}/{COMMIT}")
        commit_folder(self.storage, self.local(name), self.prefix(name))


def verified_locally(local: Path) -> bool:
    try:
        manifest = json.loads((local / COMMIT).read_text())
    except (OSError, ValueError):
        return False
    return not verify_dir(local, manifest)


# ---------------------------------------------------------------- the latent cache


def ensure_latent_cache(store: FolderStore, cache_fp: str, build: Fill, bus: events.EventBus) -> Path:
    """RUN/cache/FP, verified locally: the local copy, else a download, else built once here and committed.

    A stored copy that does not verify is rebuilt and replaces it (uncommitted first)."""
    name = f"cache/{cache_fp}"
    stored_is_bad = False
    if not store.is_local(name):
        try:
            return store.fetch(name)
        except CheckpointCorrupt as exc:
            stored_is_bad = store.is_committed(name)
            if stored_is_bad:
                bus.emit(events.Warning(f"stored latent cache unusable ({exc}); rebuilding it", kind="cache"))
        store.build(name, build, {"fingerprint": cache_fp})
    if stored_is_bad or not store.is_committed(name):
        store.commit(name, replace=stored_is_bad)
    return store.local(name)


# ---------------------------------------------------------------- the compile cache


def fetch_compile_cache(store: FolderStore, key: str, bus: events.EventBus) -> bytes | None:
    """The stored compile artifacts for `key` (see runner.train.compiling.compile_cache_key), verified; None
    when there are none yet or the stored copy is unusable (then a warning says so)."""
    name = f"compile-cache/{key}"
    try:
        if not store.is_local(name) and not store.is_committed(name):
            return None
        return (store.fetch(name) / COMPILE_CACHE_FILE).read_bytes()
    except (CheckpointCorrupt, StorageError, OSError) as exc:
        shutil.rmtree(store.local(name), ignore_errors=True)
        bus.emit(events.Warning(f"stored compile cache unusable ({exc}); compiling", kind="compile"))
        return None


def store_compile_cache(store: FolderStore, key: str, blob: bytes) -> None:
    """Commit `blob` as RUN/compile-cache/KEY/ (files first, COMMIT.json last), unless one is there."""
    name = f"compile-cache/{key}"
    if store.is_committed(name):
        return
    store.build(name, lambda d: (d / COMPILE_CACHE_FILE).write_bytes(blob), {"compile_cache": key})
    store.commit(name)


# ---------------------------------------------------------------- the latent cache, in pieces

BuildPiece = Callable[[int, int, Path], object]
"""Encodes records [start, stop) into the (empty) local folder it is given."""
Merge = Callable[[Path, list[str]], object]
"""Writes the cache's index.json over its pieces (sub-folder names), in order."""


def ensure_latent_cache_in_pieces(
    store: FolderStore, cache_fp: str, ranges: list[tuple[int, int]], build_piece: BuildPiece, merge: Merge,
    bus: events.EventBus,
) -> tuple[Path, int]:  # fmt: skip
    """RUN/cache/FP built and committed piece by piece, so a session killed while building it loses one
    piece at most: each piece RUN/cache/FP/piece-NNNNN is a committed folder of its own, reused (local,
    else downloaded) by the next session; RUN/cache/FP's COMMIT.json, committed last, lists index.json
    and names every piece. Returns (local folder, pieces built here).

    A cache committed whole by an earlier Relay (no pieces named) is used as it is."""
    name = f"cache/{cache_fp}"
    if _cache_complete_locally(store, name):
        return store.local(name), 0
    if store.is_committed(name):
        try:
            _fetch_top_and_pieces(store, name)
            return store.local(name), 0
        except CheckpointCorrupt as exc:
            bus.emit(events.Warning(f"stored latent cache unusable ({exc}); rebuilding the pieces it lacks",
                                    kind="cache"))  # fmt: skip
            store.storage.delete(f"{store.prefix(name)}/{COMMIT}")
    (store.local(name) / COMMIT).unlink(missing_ok=True)
    pieces, built = [], 0
    for k, (start, stop) in enumerate(ranges):
        piece = f"piece-{k:05d}"
        pieces.append(piece)
        meta = {"fingerprint": cache_fp, "records": [start, stop]}
        if _piece_reusable(store, f"{name}/{piece}", meta):
            continue
        store.build(f"{name}/{piece}", lambda d, a=start, b=stop: build_piece(a, b, d), meta)
        store.commit(f"{name}/{piece}", replace=True)
        built += 1
    local = store.local(name)
    merge(local, pieces)
    write_manifest(local, {"fingerprint": cache_fp, "pieces": pieces}, names=["index.json"])
    store.commit(name, replace=True)
    return local, built


def _piece_reusable(store: FolderStore, name: str, meta: dict) -> bool:
    """A piece committed earlier (here, or in storage by a session that was killed later) for these records."""
    try:
        if not store.is_local(name):
            if not store.is_committed(name):
                return False
            store.fetch(name)
        if json.loads((store.local(name) / COMMIT).read_text()).get("meta") != meta:
            return False
        if not store.is_committed(name):
            store.commit(name)  # built here by a session killed before its upload
        return True
    except (CheckpointCorrupt, OSError, ValueError):
        shutil.rmtree(store.local(name), ignore_errors=True)
        return False


def _cache_complete_locally(store: FolderStore, name: str) -> bool:
    if not store.is_local(name):
        return False
    meta = json.loads((store.local(name) / COMMIT).read_text()).get("meta", {})
    return all(store.is_local(f"{name}/{piece}") for piece in meta.get("pieces", []))


def _fetch_top_and_pieces(store: FolderStore, name: str) -> None:
    local = store.fetch(name)
    for piece in json.loads((local / COMMIT).read_text()).get("meta", {}).get("pieces", []):
        store.fetch(f"{name}/{piece}")
