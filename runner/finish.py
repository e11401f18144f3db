"""What a session leaves in storage when it ends: its record, its logs, the loss curve, and final/ when done.

Owns: `SessionFinish` — appending the session to sessions.jsonl, uploading this session's TensorBoard files,
drawing RUN/loss.png, committing final/ (from the trained weights, or from the newest checkpoint when an
earlier session reached the target), publishing it, flushing a store that writes back late, releasing a
Colab GPU, and removing a refused new run's files while the lease is still held. Every part is best effort
except final/ itself. Must not: decide whether the run is complete or how the session ends (session.py), or
import torch at module level.
"""

from __future__ import annotations

import logging
from pathlib import Path

from runner import events
from runner.checkpoint.manager import Restored
from runner.checkpoint.store import FolderStore
from runner.context import Context
from runner.errors import LeaseHeld, LeaseLapsed, RelayError, StorageError
from runner.state import RunState, append_session
from runner.storage import Storage, WritesBackLate, capability
from runner.storage.url import is_vm_local

log = logging.getLogger(__name__)


def logs_dir(ctx: Context) -> Path:
    """This session's TensorBoard folder; each session writes its own files, uploaded when it ends."""
    return ctx.workdir / "logs" / ctx.session_id


class SessionFinish:
    """The end of one session in storage. `fenced` is the run's storage behind the lease; `store` its folder
    store (final/). The session record, logs and loss curve go through the plain storage: the session decides
    to write them only while its lease was not lost."""

    def __init__(self, ctx: Context, fenced: Storage, store: FolderStore) -> None:
        self.ctx = ctx
        self.fenced = fenced
        self.store = store

    def record_session(self, record: dict) -> None:
        try:
            append_session(self.ctx.storage, self.ctx.run, record)
        except StorageError as exc:
            log.warning("could not record the session in sessions.jsonl: %s", exc)

    def upload_logs(self) -> None:
        """TensorBoard files grow during a session, so they go up once, at its end, under the session's id."""
        folder = logs_dir(self.ctx)
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                key = f"{self.ctx.run}/logs/{self.ctx.session_id}/{path.relative_to(folder).as_posix()}"
                try:
                    self.ctx.storage.put(path, key)
                except StorageError as exc:
                    log.warning("log file %s not uploaded: %s", path.name, exc)

    def loss_curve(self) -> Path | None:
        """RUN/loss.png (and workdir/loss.png): train and validation loss over every session so far. Best effort."""
        from runner.losscurve import update_loss_curve

        try:
            # RUN/logs/ holds one folder per session: this session's is there already, the others are fetched
            return update_loss_curve(self.ctx.storage, self.ctx.run, logs_dir(self.ctx).parent,
                                     self.ctx.workdir / "loss.png")  # fmt: skip
        except (OSError, ValueError, StorageError) as exc:
            self.ctx.bus.emit(events.Warning(f"loss curve not drawn: {exc}", kind="logs"))
            return None

    def flush(self) -> None:
        """The Colab mount: push what it holds before the VM can die."""
        late = capability(self.ctx.storage, WritesBackLate)
        if late is not None:
            late.flush()

    def forget_run(self, *, keep: str) -> None:
        """A new run refused as bad input (its dataset, its plan) trained nothing: remove what this session
        wrote for it (run.json, sessions.jsonl, logs) but `keep` (the lease), so a typo leaves no run behind.
        Through the fenced storage, so only while the lease is still ours: once it is released another trainer
        may own the run. Best effort."""
        try:
            for key in self.fenced.list(self.ctx.run):
                if key != keep:
                    self.fenced.delete(key)
        except (StorageError, LeaseHeld, LeaseLapsed) as exc:
            log.warning("could not remove the refused run's files: %s", exc)

    def from_checkpoint(self, state: RunState, restored: Restored, device: str) -> None:
        """The target was reached earlier: make sure final/ exists (a kill may have come before it)."""
        if self.store.is_committed("final"):
            self.ctx.bus.emit(events.Notice(f"run already complete at step {state.step}; final/ is in storage"))
            return
        from runner.train.run import read_lora_file

        self.commit_final(read_lora_file(restored.dir), state.step, state.sessions, device)

    def commit_final(self, lora_sd, steps: int, sessions: list[dict], device: str, unet=None) -> None:
        from runner.export import commit_final

        curve = self.loss_curve()  # final/ carries it too
        commit_final(self.store, self.ctx.profile, lora_sd, steps=steps, sessions=sessions, device=device, unet=unet,
                     bus=self.ctx.bus, loss_curve=curve)  # fmt: skip
        from runner.publish import publish_at_completion

        try:
            publish_at_completion(self.ctx.storage, self.ctx.run, self.ctx.profile.publish)
        except RelayError as exc:  # final/ is committed; publishing can be retried by hand
            self.ctx.bus.emit(events.Warning(f"publishing final/ failed: {exc}; run relay publish to retry",
                                             kind="upload"))  # fmt: skip

    def release_gpu(self) -> None:
        if self.ctx.profile.session.release_gpu and self.ctx.env.platform == "colab":
            if is_vm_local(self.ctx.opts.storage):  # the only copy of final/ would go with the VM
                self.ctx.bus.emit(events.Warning("release_gpu ignored: the run's storage is on this VM's disk; "
                                                 "download final/ first", kind="storage"))  # fmt: skip
                return
            self.flush()
            from google.colab import runtime  # only on Colab

            try:
                runtime.unassign()  # POSTs the release, then needs the notebook kernel (colabtools runtime.py)
            except AttributeError:  # a `!` child: the VM is already released; the notebook cell does this itself
                log.info("runtime.unassign() outside the notebook kernel: use the notebook cell's release_gpu")
