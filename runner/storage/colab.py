"""The Colab Drive mount backend (`--storage drive` or a path under /content/drive).

Owns: mounting Google Drive on Colab (google.colab.drive, imported only when needed),
`ColabDriveStorage` — LocalStorage over the mount path — and `flush()`, which calls
drive.flush_and_unmount(), the only way to push the mount's pending writes to Drive.
Also maps the mount's failure modes to StorageError: "Transport endpoint is not connected"
(ENOTCONN: the mount dropped, which happens after hours) and EIO become transient errors
whose message recommends the Drive API backend.

What the mount does not guarantee (see docs/storage.md): Drive receives writes
asynchronously, so a file closed on the mount may reach Drive late, empty or torn if the VM
dies before flush(). The mount must therefore receive committed copies only: the session
stages data and checkpoints on local disk and puts finished files here; the API backend
(gdrive://) is the one to use for runs that span sessions.

Must not: read training data from the mount during training, or rely on anything being on
Drive before flush() returns; import google.colab at module level.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from runner.errors import StorageError, UsageError
from runner.storage.local import LocalStorage

log = logging.getLogger(__name__)
T = TypeVar("T")

MOUNT_POINT = Path("/content/drive")
DEFAULT_FOLDER = Path("MyDrive") / "relay"  # where `--storage drive` keeps runs, under the mount point
FLUSH_TIMEOUT_MS = 30 * 60 * 1000  # flush_and_unmount waits this long for pending writes
_DROPPED = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
_ADVICE = "use the Drive API backend (--storage gdrive://FOLDER_ID), which does not depend on the mount"


class DriveMounter(Protocol):
    """What google.colab.drive offers; injected so tests run without Colab."""

    def mount(self, mount_point: str) -> None: ...

    def flush_and_unmount(self, timeout_ms: int) -> None: ...


class ColabMounter:
    """google.colab.drive, imported on first use."""

    def _drive(self) -> Any:
        """The google.colab.drive module, or None off Colab."""
        try:
            from google.colab import drive  # type: ignore[import-not-found]
        except ImportError:
            return None
        return drive

    def mount(self, mount_point: str) -> None:
        drive = self._drive()
        if drive is None:
            raise UsageError(
                f"Google Drive is not mounted at {mount_point}, and Relay can mount it only on Colab",
                hint=_ADVICE + ", or a local folder",
            )
        try:
            drive.mount(mount_point, force_remount=True)  # force: a dropped mount still looks mounted
        except NotImplementedError:  # no /var/colab/hostname: Kaggle's image has google.colab but no mount (drive.py)
            raise UsageError(
                f"Google Drive is not mounted at {mount_point}, and this platform cannot mount it (not Colab)",
                hint=_ADVICE,
            ) from None
        except (AttributeError, RuntimeError, ValueError, OSError, TimeoutError) as exc:
            # Mounting asks the notebook front-end for consent through the kernel: from a `!relay …` child process
            # get_ipython() is None and colabtools raises AttributeError (google/colab/_message.py).
            raise UsageError(
                f"could not mount Google Drive at {mount_point} ({type(exc).__name__}: {exc})",
                hint=f"mount it in a notebook cell first: from google.colab import drive; drive.mount('{mount_point}') "
                f"— then run relay again; or {_ADVICE}",
            ) from None

    def flush_and_unmount(self, timeout_ms: int) -> None:
        drive = self._drive()
        if drive is None:
            log.info("not on Colab: no Drive mount to flush")
            return
        drive.flush_and_unmount(timeout_ms=timeout_ms)


def _is_mounted(mount_point: Path) -> bool:
    try:
        return (mount_point / "MyDrive").is_dir() or os.path.ismount(mount_point)
    except OSError:
        return False


class ColabDriveStorage(LocalStorage):
    """LocalStorage on the Drive mount, remounting after flush() and translating mount failures."""

    def __init__(self, root: Path, *, mount_point: Path = MOUNT_POINT, mounter: DriveMounter | None = None) -> None:
        self.mount_point = Path(mount_point)
        self._mounter = mounter if mounter is not None else ColabMounter()
        self._ensure_mounted()
        super().__init__(root)

    def __repr__(self) -> str:
        return f"ColabDriveStorage({self.url!r})"

    def put(self, local_file: Path, key: str) -> None:
        self._guarded(key, "write", lambda: super(ColabDriveStorage, self).put(local_file, key))

    def get(self, key: str, local_file: Path) -> None:
        self._guarded(key, "read", lambda: super(ColabDriveStorage, self).get(key, local_file))

    def list(self, prefix: str) -> list[str]:
        return self._guarded(prefix, "list", lambda: super(ColabDriveStorage, self).list(prefix))

    def delete(self, key: str) -> None:
        self._guarded(key, "delete", lambda: super(ColabDriveStorage, self).delete(key))

    def exists(self, key: str) -> bool:
        return self._guarded(key, "check", lambda: super(ColabDriveStorage, self).exists(key))

    def flush(self) -> None:
        """Push every pending write to Drive (unmounts; the next operation remounts). Call at session end."""
        try:
            self._mounter.flush_and_unmount(FLUSH_TIMEOUT_MS)
        except (ValueError, OSError) as exc:
            raise StorageError(
                f"flushing the Colab Drive mount failed ({type(exc).__name__}): files written this session "
                "may not have reached Drive",
                hint=_ADVICE,
            ) from None
        log.info("Drive mount flushed and unmounted")

    def _ensure_mounted(self) -> None:
        if not _is_mounted(self.mount_point):
            log.info("mounting Google Drive at %s", self.mount_point)
            self._mounter.mount(str(self.mount_point))

    def _guarded(self, key: str, action: str, operation: Callable[[], T]) -> T:
        try:
            self._ensure_mounted()
            return operation()
        except OSError as exc:  # LocalStorage lets a few (is_file, is_dir) through untranslated
            raise self._translate(exc, key, action) from exc

    def _translate(self, exc: OSError, key: str, action: str) -> StorageError:
        if exc.errno in _DROPPED:
            return StorageError(
                f"the Colab Drive mount dropped ({exc.strerror}) while trying to {action} {key or self.url}",
                key=key,
                transient=True,
                hint=f"remount with drive.mount('{self.mount_point}', force_remount=True); better, {_ADVICE}",
            )
        return super()._translate(exc, key, action)


def open_colab_drive(
    url: str,
    *,
    env: Mapping[str, str] | None = None,
    mounter: DriveMounter | None = None,
    mount_point: Path = MOUNT_POINT,
) -> ColabDriveStorage:
    """`drive` → MOUNT_POINT/MyDrive/relay, mounting it; a path under the mount point → that folder.

    `env` is accepted for symmetry with open_gdrive; the mount needs no credentials (Colab asks).
    """
    del env
    root = mount_point / DEFAULT_FOLDER if url == "drive" else Path(url)
    if url != "drive" and not Path(os.path.abspath(root)).is_relative_to(mount_point):
        raise UsageError(f"--storage {url!r} is not under the Colab Drive mount {mount_point}")
    log.warning(
        "Colab Drive mount: Drive receives writes asynchronously and the mount can drop after hours; "
        "for runs that span sessions prefer --storage gdrive://FOLDER_ID"
    )
    return ColabDriveStorage(root, mount_point=mount_point, mounter=mounter)
