"""Where a run's checkpoints live in its storage: RUN/checkpoints/step-XXXXXXXX/, each with its COMMIT.json.

Owns: the folder names (`step_dir_name`, `step_of_dir`), listing them (`step_folders`,
`committed_steps`) and the names inside them (STATE_FILE). Readers that only look (relay status,
relay compare) and the checkpoint manager that writes them use the same names.

Must not: write, delete or verify anything (runner.checkpoint.manager does), or import torch.
"""

from __future__ import annotations

import re

from runner.checkpoint.manifest import COMMIT
from runner.storage import Storage

STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"  # RUN/checkpoints/step-N/
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of_dir(name: str) -> int | None:
    """The step of a checkpoint folder name ("step-00000400" → 400); None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def committed_steps(storage: Storage, run: str) -> list[int]:
    """Steps whose RUN/checkpoints/step-N/ holds a COMMIT.json, ascending (not verified: `latest` verifies)."""
    return sorted(s for s, names in step_folders(storage, f"{run}/{CHECKPOINT_DIR}").items() if COMMIT in names)


def step_folders(storage: Storage, prefix: str) -> dict[int, set[str]]:
    """step → file names (relative to the step folder) of the checkpoint folders under `prefix`."""
    folders: dict[int, set[str]] = {}
    for key in storage.list(prefix):
        rest = key[len(prefix) + 1 :] if key.startswith(prefix + "/") else ""
        head, _, name = rest.partition("/")
        step = step_of_dir(head)
        if step is not None and name:
            folders.setdefault(step, set()).add(name)
    return folders
