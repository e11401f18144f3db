"""COMMIT.json: the marker that makes a folder in storage exist.

Owns: writing the manifest of a local folder (every file with its size and
sha256, plus metadata), checking a folder against one, and the two transfers
that follow the commit protocol: `commit_folder` uploads every file first and
COMMIT.json last (or all in one atomic commit where the backend offers
`commit_folder`, as the Hub does); `fetch_folder` downloads a committed folder and verifies each
file. A folder in storage exists if and only if its COMMIT.json exists and every
listed file matches it. Used for checkpoints and for the latent cache.

Must not: know about steps, rotation or torch; rely on rename, overwrite or
listing order in storage; retry (backends and the manager do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from runner.clock import Clock, SystemClock, iso
from runner.errors import CheckpointCorrupt, StorageError
from runner.storage import AtomicFolders, Storage, capability
from runner.storage.local import TMP_MARK

log = logging.getLogger(__name__)

COMMIT = "COMMIT.json"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 1 << 20

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _is_ours(name: str) -> bool:
    """The manifest itself and the temporary files of writing or fetching one (or of a storage get)."""
    base = name.rsplit("/", 1)[-1]
    return name == COMMIT or base.startswith(f".{COMMIT}.") or TMP_MARK in base


def _folder_files(local_dir: Path) -> list[str]:
    """Every file under local_dir except the manifest and temporaries, as sorted '/'-separated names."""
    names = [p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()]
    return sorted(n for n in names if not _is_ours(n))


def write_manifest(local_dir: Path, meta: dict, *, clock: Clock | None = None, names: list[str] | None = None) -> dict:
    """Hash every file in `local_dir` (or only `names`: a folder that holds committed folders of its own),
    write local_dir/COMMIT.json, and return the manifest."""
    local_dir = Path(local_dir)
    files = {}
    for name in _folder_files(local_dir) if names is None else sorted(names):
        path = local_dir / name
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "version": MANIFEST_VERSION,
        "files": files,
        "meta": meta,
        "created": iso((clock or SystemClock()).wall()),
    }
    tmp = local_dir / f".{COMMIT}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, local_dir / COMMIT)
    return manifest


def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest from COMMIT.json bytes; CheckpointCorrupt(path=where) if it is not a valid one."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{where}: COMMIT.json is not valid JSON ({exc})", path=where) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorrupt(f"{where}: COMMIT.json has no 'files' table", path=where)
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise CheckpointCorrupt(
            f"{where}: COMMIT.json version {version!r} is not one this Relay reads (up to {MANIFEST_VERSION}); "
            "upgrade Relay to use it",
            path=where,
        )
    for name, entry in manifest["files"].items():
        _check_entry(name, entry, where)
    manifest.setdefault("meta", {})
    return manifest


def _check_entry(name: str, entry: object, where: str) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or name == COMMIT:
        raise CheckpointCorrupt(f"{where}: COMMIT.json lists an invalid file name {name!r}", path=where)
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )
    if not ok:
        raise CheckpointCorrupt(f"{where}: COMMIT.json entry for {name!r} needs size and sha256", path=where)


def verify_dir(local_dir: Path, manifest: dict) -> list[str]:
    """What in `local_dir` differs from `manifest` (one line per file); empty when every file matches."""
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = Path(local_dir) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name}: {size} bytes, COMMIT.json says {entry['size']}")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest[:12]}…, COMMIT.json says {entry['sha256'][:12]}…")
    return problems


def read_local_manifest(local_dir: Path) -> dict:
    path = Path(local_dir) / COMMIT
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: no COMMIT.json; write_manifest() must run before the upload", path=str(path))
    return parse_manifest(path.read_bytes(), str(path))


def commit_folder(storage: Storage, local_dir: Path, prefix: str, *, progress: Progress | None = None) -> dict:
    """Upload every file listed in local_dir/COMMIT.json under `prefix`, then COMMIT.json last."""
    local_dir = Path(local_dir)
    prefix = prefix.strip("/")
    manifest = read_local_manifest(local_dir)
    names = sorted(manifest["files"])
    for name in names:  # a cheap guard against a folder changed after write_manifest
        size = (local_dir / name).stat().st_size if (local_dir / name).is_file() else None
        if size != manifest["files"][name]["size"]:
            raise CheckpointCorrupt(f"{local_dir / name}: changed after COMMIT.json was written", path=str(local_dir))
    commit_size = (local_dir / COMMIT).stat().st_size
    total = sum(manifest["files"][n]["size"] for n in names) + commit_size
    folders = capability(storage, AtomicFolders)
    if folders is not None:  # a backend with atomic multi-file commits (the Hub): files and COMMIT.json at once
        folders.commit_folder(local_dir, prefix, names + [COMMIT])
        if progress is not None:
            progress(total, total)
        log.debug("committed %s (%d files, %d bytes) to %s in one commit", prefix, len(names), total, storage.url)
        return manifest
    done = 0
    for name in names + [COMMIT]:
        storage.put(local_dir / name, f"{prefix}/{name}")
        done += commit_size if name == COMMIT else manifest["files"][name]["size"]
        if progress is not None:
            progress(done, total)
    log.debug("committed %s (%d files, %d bytes) to %s", prefix, len(names), total, storage.url)
    return manifest


def fetch_folder(storage: Storage, prefix: str, local_dir: Path) -> dict:
    """Download the committed folder at `prefix` into local_dir, verify every file, return its manifest.

    Raises CheckpointCorrupt (path = the storage location) when there is no COMMIT.json, or a listed
    file is missing or differs in size or sha256. Transient StorageErrors propagate unchanged, so a
    network hiccup is never mistaken for a broken checkpoint.
    """
    prefix = prefix.strip("/")
    where = f"{storage.url}/{prefix}"
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if not storage.exists(f"{prefix}/{COMMIT}"):
        raise CheckpointCorrupt(f"{where}: not committed (no COMMIT.json)", path=where)
    raw_path = local_dir / f".{COMMIT}.fetched"
    _get(storage, f"{prefix}/{COMMIT}", raw_path, where)
    manifest = parse_manifest(raw_path.read_bytes(), where)
    for name in sorted(manifest["files"]):
        _get(storage, f"{prefix}/{name}", local_dir / name, where)
    problems = verify_dir(local_dir, manifest)
    if problems:
        raise CheckpointCorrupt(f"{where}: files do not match COMMIT.json: " + "; ".join(problems), path=where)
    os.replace(raw_path, local_dir / COMMIT)  # the local copy is committed only once it verified
    return manifest


def _get(storage: Storage, key: str, dest: Path, where: str) -> None:
    try:
        storage.get(key, dest)
    except StorageError as exc:
        if exc.transient:
            raise
        name = key.rsplit("/", 1)[-1]
        raise CheckpointCorrupt(
            f"{where}: {name} is listed in COMMIT.json but cannot be read ({exc})", path=where
        ) from exc
