"""A Storage backed by a local folder (also a mounted Google Drive folder).

Owns: put/get/list/delete/exists on a directory tree, with writes that readers
never see half done: every write goes to a temporary name in the target's own
folder, is fsynced, then moved over the target with os.replace. `list` hides
those temporary names. OS errors become StorageError with a message that names
the key and says what to do (a full disk says "disk full").

Must not: know about checkpoints, runs or torch; retry (a local disk has no
transient errors worth waiting for; the Colab-mount backend adds its own
mapping for a dropped mount by overriding `_translate`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath

from runner.errors import StorageError, StorageLocationError

log = logging.getLogger(__name__)

TMP_MARK = ".relay-tmp-"  # part of every temporary file name; list() skips such names
COPY_CHUNK_BYTES = 1 << 20
STALE_TEMP_S = 600.0  # a temporary file this old was left by a put that died


def _is_temp(name: str) -> bool:
    return TMP_MARK in name


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in `path`'s folder (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; best effort (some file systems, e.g. FUSE mounts, refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` so that `dest` is either absent/old or the whole new file. Raises OSError."""
    tmp = temp_sibling(dest)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, COPY_CHUNK_BYTES)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


class LocalStorage:
    """Keys are '/'-separated paths under `root`. Safe for concurrent readers of one writer per key."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = self._translate(exc, "", "create the storage folder")
            if error.transient:
                raise error from exc
            raise StorageLocationError(  # a folder that cannot be created is bad input (exit 2), not a failure
                error.message, key="", hint=error.hint or "choose a --storage folder that exists or can be created"
            ) from exc

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"

    def put(self, local_file: Path, key: str) -> None:
        dest = self._path(key)
        try:
            for attempt in range(2):
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    atomic_copy(Path(local_file), dest)
                    return
                except FileNotFoundError:
                    # A concurrent delete may have pruned the (then empty) folder; make it again once.
                    if attempt or not Path(local_file).is_file():
                        raise
        except OSError as exc:
            raise self._translate(exc, key, f"write {local_file} to") from exc

    def get(self, key: str, local_file: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(
                f"{self.url}: no file at key {key!r}",
                key=key,
                hint="check the storage URL and run name; `relay status` lists what the storage holds",
            )
        local_file = Path(local_file)
        try:
            local_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(src, local_file)
        except FileNotFoundError as exc:
            if not src.exists():  # deleted between the check and the copy
                raise StorageError(f"{self.url}: no file at key {key!r}", key=key) from exc
            raise self._translate(exc, key, f"read into {local_file} from") from exc
        except OSError as exc:
            raise self._translate(exc, key, f"read into {local_file} from") from exc

    def list(self, prefix: str) -> list[str]:
        clean = prefix.strip("/")
        base = self._path(clean) if clean else self.root
        if not base.is_dir():
            return []
        keys, with_temps = [], []
        try:
            for folder, _dirs, files in os.walk(base):
                rel = Path(folder).relative_to(self.root)
                for name in files:
                    if _is_temp(name):
                        with_temps.append(Path(folder))
                    else:
                        keys.append((rel / name).as_posix())
            for folder in dict.fromkeys(with_temps):  # a dead put's temp may be all its folder holds: no
                self._sweep_stale_temps(folder)  # delete() would ever visit it, so listing sweeps it
                self._prune_empty(folder)
        except OSError as exc:
            raise self._translate(exc, prefix, "list") from exc
        return keys

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            self._sweep_stale_temps(path.parent)
        except OSError as exc:
            raise self._translate(exc, key, "delete") from exc
        self._prune_empty(path.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _path(self, key: str) -> Path:
        """The file for `key`; refuses keys that would leave the root or name a temporary file."""
        parts = PurePosixPath(key).parts
        bad = not key or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts)
        if bad or _is_temp(key):
            raise StorageError(
                f"invalid storage key {key!r}: keys are relative '/'-separated paths without '..'",
                key=key,
            )
        return self.root.joinpath(*parts)

    def _sweep_stale_temps(self, folder: Path) -> None:
        """Temporary files of puts killed mid-copy (a dead VM) are invisible to list(); when their folder is
        being emptied they would keep it alive forever. Old ones cannot belong to a put still running."""
        now = time.time()
        for temp in folder.glob(f".*{TMP_MARK}*"):
            try:
                if now - temp.stat().st_mtime > STALE_TEMP_S:
                    temp.unlink()
            except FileNotFoundError:
                continue

    def _prune_empty(self, folder: Path) -> None:
        """Remove folders left empty by delete, up to the root (so deleted checkpoints leave no husk)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def _translate(self, exc: OSError, key: str, action: str) -> StorageError:
        """An OSError as a StorageError that says what failed and what to do."""
        where = f"{self.url}/{key}" if key else self.url
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(
                f"disk full: could not {action} {where}",
                key=key,
                hint="free space there (old runs, caches) or point --storage at a bigger disk",
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageError(
                f"permission denied: could not {action} {where} ({exc.strerror})",
                key=key,
                hint="choose a --storage folder you can write to",
            )
        return StorageError(f"could not {action} {where}: {exc}", key=key)
