"""Secrets handed to a long-lived child process without leaving them in its /proc/PID/environ.

Owns: `hand_over(env)`, which moves the secret variables of a child's environment into a new 0600 file
and leaves only that file's path (RELAY_SECRETS_FILE) in the environment, and `take_over(environ)`, which
the child calls first thing: it reads the file, deletes it, and sets the secrets in its own process only.

Why: a process's initial environment stays readable in /proc/PID/environ (`ps e`) for as long as it
runs, to every process of the same user (on Colab everything runs as root). Variables set after the
start (os.environ → putenv) live in the process's heap, not in that initial block, so they do not show
there; the child's own children get them again only through hand_over. What remains: the secret is in
the memory of each process that uses it, and in the file for the moment between the start and
take_over (0600, deleted at once); docs/storage.md says so.

Must not: log or print a secret, or know where a secret comes from.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, MutableMapping

ENV_FILE = "RELAY_SECRETS_FILE"
SECRET_NAMES = ("RELAY_GDRIVE_CREDENTIALS", "HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "WANDB_API_KEY")
"""The variables that carry credentials (runner.notebook reads them from the notebook's secrets)."""


def hand_over(env: Mapping[str, str], folder: str | None = None) -> dict[str, str]:
    """`env` without its secret values, plus RELAY_SECRETS_FILE naming a new 0600 file (in `folder`, default
    the system's temporary folder) that holds them. Unchanged when `env` carries no secret."""
    secrets = {k: v for k, v in env.items() if k in SECRET_NAMES and v}
    child = {k: v for k, v in env.items() if k not in SECRET_NAMES and k != ENV_FILE}
    if not secrets:
        return child
    fd, path = tempfile.mkstemp(prefix=".relay-secrets-", dir=folder)  # created 0600, readable by its owner only
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(secrets, f)
    child[ENV_FILE] = path
    return child


def take_over(environ: MutableMapping[str, str]) -> None:
    """Set the secrets of RELAY_SECRETS_FILE in `environ` (this process only) and delete the file.
    A file that is gone (a restart of the same process) or unreadable leaves `environ` as it is."""
    path = environ.pop(ENV_FILE, "")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            secrets = json.load(f)
    except (OSError, ValueError):
        return
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    for name, value in secrets.items():
        if name in SECRET_NAMES and isinstance(value, str):
            environ[name] = value
