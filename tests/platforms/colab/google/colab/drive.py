"""The Drive mount (colabtools google/colab/drive.py at 3c07d776: mount → _mount, flush_and_unmount).

Kept from the real one: NotImplementedError where /var/colab/hostname does not exist (the stand-in
looks under $DATALAB_ROOT), ValueError for a mount point with a space, the frontend request
('request_auth', dfs_ephemeral) that needs the kernel (AttributeError from a `!` child), and the
"already mounted" test exactly as colabtools writes it: a folder named `My Drive` (with a space) in the
mount point. The mount itself shows Drive as MOUNTPOINT/MyDrive (Colab's own snippets use
/content/drive/MyDrive), so that test does not fire and a second mount remounts, as on Colab.
`flush_and_unmount()` says "Drive not mounted, so nothing to flush and unmount." when nothing is
mounted; otherwise it unmounts. A mount after it fails with `ValueError: mount failed` for the rest of
the runtime (colabtools issue #4773, reproduced by users with flush_and_unmount then mount).
The stand-in's "Drive" is a local folder: $DATALAB_ROOT/drive-contents; the runtime's mount state is in
$DATALAB_ROOT/var/colab/standin-drive.json.
"""

import json as _json
import os as _os

from google.colab import _message

__all__ = ["flush_and_unmount", "mount"]


def _root():
    return _os.environ.get("DATALAB_ROOT", "/")


def _state_path():
    return _os.path.join(_root(), "var/colab/standin-drive.json")


def _state():
    try:
        with open(_state_path(), encoding="utf-8") as f:
            return _json.load(f)
    except (OSError, ValueError):
        return {}


def _save(state):
    with open(_state_path(), "w", encoding="utf-8") as f:
        _json.dump(state, f)


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
    if _os.path.isdir(_os.path.join(mountpoint, "My Drive")) and not force_remount:  # colabtools' own test
        print(
            f'Drive already mounted at {mountpoint}; to attempt to forcibly remount, call drive.mount("{mountpoint}", force_remount=True).'
        )
        return
    state = _state()
    if state.get("flushed_and_unmounted"):
        raise ValueError("mount failed")  # colabtools #4773
    my_drive = _os.path.join(mountpoint, "MyDrive")
    if _os.path.islink(my_drive):
        _os.unlink(my_drive)  # umount -f, then mount again
    contents = _os.path.join(_root(), "drive-contents")
    _os.makedirs(contents, exist_ok=True)
    _os.makedirs(mountpoint, exist_ok=True)
    _os.symlink(contents, my_drive)
    _save({**state, "mounted": mountpoint})
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms=24 * 60 * 60 * 1000):
    _message.record("drive.flush_and_unmount")
    state = _state()
    mountpoint = state.get("mounted")
    if not mountpoint:
        print("Drive not mounted, so nothing to flush and unmount.")
        return
    my_drive = _os.path.join(mountpoint, "MyDrive")
    if _os.path.islink(my_drive):
        _os.unlink(my_drive)
    _save({"flushed_and_unmounted": True})
