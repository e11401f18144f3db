"""The notebook side's platform and secrets: what only a notebook kernel can read or do for the trainer.

Owns: which platform the kernel runs on (`platform_of`, `is_headless`), reading Colab or Kaggle notebook
secrets (`read_secret`) and putting them into the trainer's environment (`trainer_env`) or the chain's
(`add_secrets`), Colab's sign-in for Drive without a Google Cloud project, and the Drive mount. Colab's
services talk to the frontend through the kernel (colabtools google/colab/_message.py uses
get_ipython().kernel; a `!` child has none), so these run in the kernel and nowhere else.

Must not: print or write a secret (it reaches a child only through its environment), start or follow the
trainer (runner/notebook.py does), or import torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from runner import colabkernel

SECRET_NAMES = ("RELAY_GDRIVE_CREDENTIALS", "HF_TOKEN")
# The user's own Kaggle credential, for the chain only: the API token ("Generate New Token"), or a legacy key
CHAIN_SECRET_NAMES = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")
ADC = "application-default"
"""RELAY_GDRIVE_CREDENTIALS value that tells the trainer to use Google's application-default credentials
(what Colab's sign-in installs; runner/storage/credentials.py)."""
MOUNT_POINT = "/content/drive"  # colabtools' documented mount point; runner.storage.colab uses the same


def platform_of(env: Mapping[str, str]) -> str:
    """kaggle, colab or local. Kaggle first: Kaggle's image is built on Colab's and sets COLAB_RELEASE_TAG
    too (Kaggle/docker-python #1444); only Kaggle sets KAGGLE_KERNEL_RUN_TYPE."""
    if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env:
        return "kaggle"
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env:
        return "colab"
    return "local"


def read_secret(platform: str, name: str) -> str | None:
    """A notebook secret, read in the kernel; None when it does not exist or this notebook may not read it."""
    from runner.storage.credentials import colab_secret, kaggle_secret

    if platform == "colab":
        return colabkernel.asking_twice(lambda n: colab_secret(n, on_denied=_say_denied))(name)
    return kaggle_secret(name) if platform == "kaggle" else None


def _say_denied(name: str) -> None:
    print(f"relay: the Colab secret {name} was not used: this notebook was denied access to it "
          "(grant it in the 🔑 Secrets panel, then run the cell again)")  # fmt: skip


def trainer_env(platform: str, storage: str, env: Mapping[str, str], *, sign_in: Callable[[], None]) -> dict[str, str]:
    """The trainer's environment: `env` plus the secrets it needs (never printed)."""
    child = dict(env)
    wanted = [n for n in SECRET_NAMES if n != "RELAY_GDRIVE_CREDENTIALS" or storage.startswith("gdrive://")]
    add_secrets(platform, child, wanted)
    needs_drive = storage.startswith("gdrive://") and not child.get("RELAY_GDRIVE_CREDENTIALS")
    if needs_drive and not child.get("GOOGLE_APPLICATION_CREDENTIALS") and platform == "colab":
        sign_in()  # one consent click; installs application-default credentials with Drive access
        child.update({k: v for k, v in os.environ.items() if k in ("GOOGLE_APPLICATION_CREDENTIALS",)})
        child["RELAY_GDRIVE_CREDENTIALS"] = ADC
    return child


def add_secrets(platform: str, env: dict[str, str], names: Sequence[str]) -> None:
    """Fill `env` with the notebook secrets `names` it lacks (read in the kernel; never printed)."""
    for name in names:
        if not env.get(name):
            value = read_secret(platform, name)
            if value:
                env[name] = value


def colab_sign_in() -> None:
    from google.colab import auth  # type: ignore[import-not-found]

    auth.authenticate_user()


def mount_drive(mount_point: str = MOUNT_POINT) -> None:
    colabkernel.mount_drive(mount_point)


def flush_drive(mount_point: str = MOUNT_POINT) -> None:
    colabkernel.flush_drive(mount_point)


def uses_mount(storage: str) -> bool:
    return storage == "drive" or storage.rstrip("/") == MOUNT_POINT or storage.startswith(MOUNT_POINT + "/")


def is_headless(env: Mapping[str, str]) -> bool:
    """Kaggle's "Save & Run All" (a batch run), or not in a notebook kernel at all."""
    if env.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    return getattr(get_ipython(), "kernel", None) is None
