"""The Drive mount (colabtools google/colab/drive.py: mount → _mount, flush_and_unmount).

Kept from the real one: NotImplementedError where /var/colab/hostname does not exist (the stand-in
looks under $DATALAB_ROOT), ValueError for a mount point with a space, the frontend request
('request_auth', dfs_ephemeral) that needs the kernel (AttributeError from a `!` child), "already
mounted" when the mount point holds a Drive, and the mount's layout: MOUNTPOINT/MyDrive. The stand-in's
"Drive" is a local folder: $DATALAB_ROOT/drive-contents.
"""

import os as _os

from google.colab import _message

__all__ = ["flush_and_unmount", "mount"]


def _root():
    return _os.environ.get("DATALAB_ROOT", "/")


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    if not _os.path.exists(_os.path.join(_root(), "var/colab/hostname")):
        raise NotImplementedError(
            "Mounting drive is unsupported in this environment. Use PyDrive2 instead. See examples at "
            "https://colab.research.google.com/notebooks/io.ipynb#scrollTo=7taylj9wpsA2."
        )
    if " " in mountpoint:
        raise ValueError("Mountpoint must not contain a space.")
    _message.blocking_request("request_auth", request={"authType": "dfs_ephemeral"}, timeout_sec=timeout_ms // 1000)
    _message.record("drive.mount", mountpoint=str(mountpoint))
    mountpoint = _os.path.expanduser(mountpoint)
    my_drive = _os.path.join(mountpoint, "MyDrive")
    if _os.path.isdir(my_drive) and not force_remount:
        print(
            f'Drive already mounted at {mountpoint}; to attempt to forcibly remount, call drive.mount("{mountpoint}", force_remount=True).'
        )
        return
    contents = _os.path.join(_root(), "drive-contents")
    _os.makedirs(contents, exist_ok=True)
    _os.makedirs(mountpoint, exist_ok=True)
    if not _os.path.islink(my_drive):
        _os.symlink(contents, my_drive)
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms=24 * 60 * 60 * 1000):
    _message.record("drive.flush_and_unmount")
