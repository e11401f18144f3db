"""Choose a storage backend from the --storage URL.

Owns: `open_storage(url)`, the one place that maps the accepted URL forms to a
backend. The Drive backends (runner.storage.gdrive, runner.storage.colab) and the
Hub backend (runner.storage.hub) are imported only when asked for, so a local run
never needs pydrive2, Colab or huggingface_hub.

Must not: open connections itself, read credentials, or guess: anything it does
not recognise is a UsageError that lists the accepted forms.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from runner.errors import UsageError
from runner.storage import Storage
from runner.storage.local import LocalStorage

COLAB_DRIVE_ROOT = PurePosixPath("/content/drive")
ACCEPTED_FORMS = (
    "  /path/to/folder or ./folder     a local folder\n"
    "  file:///path/to/folder           the same, as a URL\n"
    "  gdrive://FOLDER_ID               a Google Drive folder through the Drive API (works across sessions)\n"
    "  gdrive://My Drive/relay          the same, by path\n"
    "  drive or /content/drive/...      the Colab Drive mount (Colab only)\n"
    "  hf://USER/REPO[/FOLDER]          a private Hugging Face model repo (token in HF_TOKEN; works across sessions)"
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _usage(url: str, why: str) -> UsageError:
    return UsageError(f"--storage {url!r}: {why}. Accepted forms:\n{ACCEPTED_FORMS}")


def _is_colab_mount(path: str) -> bool:
    absolute = PurePosixPath(os.path.abspath(os.path.expanduser(path)))
    return absolute == COLAB_DRIVE_ROOT or COLAB_DRIVE_ROOT in absolute.parents


def _open_gdrive(url: str, env: Mapping[str, str] | None) -> Storage:
    try:
        from runner.storage.gdrive import open_gdrive
    except ImportError as exc:
        raise UsageError(
            f"--storage {url!r}: the Google Drive API backend cannot be loaded ({exc})",
            hint="install Relay with its dependencies (pip install -e .), or use a local folder",
        ) from exc
    return open_gdrive(url, env=env)


def _open_colab(url: str, env: Mapping[str, str] | None) -> Storage:
    try:
        from runner.storage.colab import open_colab_drive
    except ImportError as exc:
        raise UsageError(
            f"--storage {url!r}: the Colab Drive mount backend cannot be loaded ({exc})",
            hint="use gdrive://FOLDER_ID (the Drive API) or a local folder",
        ) from exc
    return open_colab_drive(url, env=env)


def _open_hub(url: str, env: Mapping[str, str] | None) -> Storage:
    try:
        from runner.storage.hub import open_hub
    except ImportError as exc:
        raise UsageError(
            f"--storage {url!r}: the Hugging Face Hub backend cannot be loaded ({exc})",
            hint="install Relay with its dependencies (pip install -e .), or use a local folder",
        ) from exc
    return open_hub(url, env=env)


def open_storage(url: str, *, env: Mapping[str, str] | None = None) -> Storage:
    """The backend for `url`; `env` (default: the process environment, read by the backend) carries credentials."""
    text = (url or "").strip()
    if not text:
        raise _usage(url, "empty storage location")
    if text == "drive":
        return _open_colab(text, env)
    if text.startswith("gdrive://"):
        if not text[len("gdrive://") :].strip("/"):
            raise _usage(url, "gdrive:// needs a folder id or a path")
        return _open_gdrive(text, env)
    if text.startswith("hf://"):
        return _open_hub(text, env)
    if text.startswith("file://"):
        path = text[len("file://") :]
        if not path:
            raise _usage(url, "file:// needs a path")
        return _open_path(path, env)
    if _SCHEME.match(text):
        raise _usage(url, f"unknown scheme {text.split(':', 1)[0]!r}")
    return _open_path(text, env)


def _open_path(path: str, env: Mapping[str, str] | None) -> Storage:
    if _is_colab_mount(path):
        return _open_colab(path, env)
    return LocalStorage(Path(path))
