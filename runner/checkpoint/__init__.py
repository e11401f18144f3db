"""Checkpoints and committed folders in storage.

Owns: the commit protocol (manifest.py: COMMIT.json written last marks a folder
as existing) and the checkpoint lifecycle of a run (manager.py: stage, upload in
the background, verify, rotate, restore the newest that verifies).

Must not: import torch here; tensors are written by the trainer's callback.
"""

from runner.checkpoint.manager import CheckpointManager, Restored, Staged, step_dir_name
from runner.checkpoint.manifest import COMMIT, commit_folder, fetch_folder, verify_dir, write_manifest

__all__ = [
    "COMMIT",
    "CheckpointManager",
    "Restored",
    "Staged",
    "commit_folder",
    "fetch_folder",
    "step_dir_name",
    "verify_dir",
    "write_manifest",
]
