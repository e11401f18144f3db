"""Choose a storage backend from the --storage URL.

Owns: `open_storage(url)`, the one place that maps the accepted URL forms to a
backend. The Drive backends (runner.storage.gdrive, runner.storage.colab) and the
Hub backend (runner.storage.hub) are imported only when asked for, so a local run
never needs pydrive2, Colab or huggingface_hub.

Must not: open connections itself, read credentials, or guess: anything it does
not recognise is a UsageError that lists the accepted forms.
"""

from __future__ import annotations

import importlib
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


_API_HINT = "install Relay with its dependencies (pip install -e .), or use a local folder"
BACKENDS = {  # backend → (module, opener, what it is, what to do when it cannot be imported)
    "gdrive": ("runner.storage.gdrive", "open_gdrive", "the Google Drive API backend", _API_HINT),
    "colab": ("runner.storage.colab", "open_colab_drive", "the Colab Drive mount backend",
              "use gdrive://FOLDER_ID (the Drive API) or a local folder"),
    "hub": ("runner.storage.hub", "open_hub", "the Hugging Face Hub backend", _API_HINT),
}  # fmt: skip


def _open_backend(backend: str, url: str, env: Mapping[str, str] | None) -> Storage:
    """Import a backend only when its URL is used (pydrive2, huggingface_hub), with a clear error if it can't be."""
    module_name, opener, what, hint = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--storage {url!r}: {what} cannot be loaded ({exc})", hint=hint) from exc
    return getattr(module, opener)(url, env=env)


def open_storage(url: str, *, env: Mapping[str, str] | None = None) -> Storage:
    """The backend for `url`; `env` (default: the process environment, read by the backend) carries credentials."""
    text = (url or "").strip()
    if not text:
        raise _usage(url, "empty storage location")
    if text == "drive":
        return _open_backend("colab", text, env)
    if text.startswith("gdrive://"):
        if not text[len("gdrive://") :].strip("/"):
            raise _usage(url, "gdrive:// needs a folder id or a path")
        return _open_backend("gdrive", text, env)
    if text.startswith("hf://"):
        return _open_backend("hub", text, env)
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
        return _open_backend("colab", path, env)
    return LocalStorage(Path(path))
