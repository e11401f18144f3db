"""Choose a storage backend from the --storage URL.

Owns: `open_storage(url)`, the one place that maps the accepted URL forms to a
backend. The Drive backends (runner.storage.gdrive, runner.storage.colab) and the
Hub backend (runner.storage.hub) are imported only when asked for, so a local run
never needs pydrive2, Colab or huggingface_hub.

Also owns the two checks that keep a typo from costing a run: a string that looks like a mistyped
remote form (`gdrive//x`, `hf:/u/r`, `My Drive/relay`) is refused with the form it probably meant, and
`check_vm_storage` refuses a folder on a Colab or Kaggle VM's own disk (deleted with the VM) unless the
user opted in with RELAY_STORAGE_ON_VM=1.

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
_MISTYPED = re.compile(r"^(gdrive|hf|file)(?::/?(?!/)|//)(.*)$", re.IGNORECASE)  # gdrive//x, gdrive:/x, hf:x
_DRIVE_NAMES = ("My Drive", "MyDrive", "Shared drives")  # Drive's own top folders, typed without a scheme
VM_STORAGE_OPT_IN = "RELAY_STORAGE_ON_VM"
"""Set to 1 to keep a run on a Colab or Kaggle VM's own disk, knowing that it is deleted with the VM."""
_VM_PLATFORMS = {"colab": "Colab", "kaggle": "Kaggle"}


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
    _refuse_typos(url, text)
    if _SCHEME.match(text):
        raise _usage(url, f"unknown scheme {text.split(':', 1)[0]!r}")
    return _open_path(text, env)


def _refuse_typos(url: str, text: str) -> None:
    """A remote form typed without its `://`, or a Drive path without `gdrive://`, is a typo, not a folder."""
    typo = _MISTYPED.match(text)
    if typo:
        meant = f"{typo.group(1).lower()}://{typo.group(2).lstrip('/')}"
        raise _usage(url, f"this looks like a mistyped {meant!r} (a scheme is written with '://')")
    first = PurePosixPath(text).parts[0] if not text.startswith("/") else ""
    if first in _DRIVE_NAMES:
        raise _usage(url, f"this looks like a Google Drive path: write 'gdrive://{text}' (the Drive API) or "
                     f"'/content/drive/{text.replace('My Drive', 'MyDrive', 1)}' (the Colab mount); "
                     f"for a local folder of that name write './{text}'")  # fmt: skip


def is_vm_local(url: str) -> bool:
    """Whether `url` is a folder on this machine's own disk (not Drive, the Hub or the Colab Drive mount)."""
    text = (url or "").strip()
    if text == "drive" or text.startswith(("gdrive://", "hf://")):
        return False
    return not _is_colab_mount(text.removeprefix("file://"))


def check_vm_storage(url: str, platform: str, environ: Mapping[str, str]) -> str | None:
    """On Colab or Kaggle, a folder on the VM's own disk dies with the VM: refused (UsageError) unless
    RELAY_STORAGE_ON_VM=1, then a warning to show (returned). None anywhere else or for remote storage."""
    _refuse_typos(url, (url or "").strip())  # a typo'd remote form is named as such, not as a VM folder
    where = _VM_PLATFORMS.get(platform)
    if where is None or not is_vm_local(url):
        return None
    if environ.get(VM_STORAGE_OPT_IN, "").strip().lower() not in ("1", "true", "yes"):
        raise UsageError(
            f"--storage {url!r} is a folder on this {where} VM's own disk: it is deleted with the VM, and the "
            "run with it (nothing reaches the next session)",
            hint="use gdrive://My Drive/relay or hf://YOUR_NAME/relay-runs; to keep the run on this VM anyway, "
            f"set {VM_STORAGE_OPT_IN}=1 (notebook.run(..., storage_on_vm=True)) and download final/ yourself",
        )
    return (f"storage {url!r} is on this {where} VM's own disk: it is deleted with the VM; download final/ "
            "before the session ends (the runtime is never released for you)")  # fmt: skip


def _open_path(path: str, env: Mapping[str, str] | None) -> Storage:
    if _is_colab_mount(path):
        return _open_backend("colab", path, env)
    return LocalStorage(Path(path))
