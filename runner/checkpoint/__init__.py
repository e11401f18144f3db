"""Checkpoints and committed folders in storage.

Owns: the commit protocol (manifest.py: COMMIT.json written last marks a folder
as existing) and the checkpoint lifecycle of a run (manager.py: stage, upload in
the background, verify, rotate, restore the newest that verifies) and where those folders live
(layout.py: their names and listing, for readers that only look).

Must not: import torch here; tensors are written by the trainer's callback.
"""

from runner.checkpoint.layout import step_dir_name
from runner.checkpoint.manager import CheckpointManager, Restored, Staged
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
