"""Checkpoints of one run: stage locally, upload in the background, commit, rotate, restore.

Owns: the lifecycle of RUN/checkpoints/step-XXXXXXXX/ folders (their names and listing are
runner.checkpoint.layout's). `stage` writes a checkpoint to local disk (fast: no network);
`stage_snapshot` only takes the caller's snapshot (a copy in host memory) and leaves writing it
to local disk to the worker.
`submit` hands it to one background worker that writes it if needed, uploads it
with the commit protocol (files first, COMMIT.json last), verifies the commit,
and only then deletes older checkpoints (COMMIT.json first, so a half-deleted
folder never looks committed). At most one checkpoint waits behind the one
uploading; a newer submit replaces the waiting one. `latest` restores the
newest committed checkpoint that verifies, falling back with a Warning.

Must not: import torch (the trainer's `write` callback or snapshot writes the
tensors), decide when to checkpoint (the budget does), or ever delete the only
verified checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from runner import events
from runner.checkpoint.layout import (
    CHECKPOINT_DIR,
    STATE_FILE,
    committed_steps,
    step_dir_name,
    step_folders,
    step_of_dir,
)
from runner.checkpoint.manifest import COMMIT, commit_folder, fetch_folder, write_manifest
from runner.clock import Clock, SystemClock
from runner.errors import CheckpointCorrupt, LeaseHeld, LeaseLapsed, ProfileError, RelayError, StorageError
from runner.state import RunState
from runner.storage import AtomicFolders, Storage, capability
from runner.storage.retry import RetryPolicy, call_with_retry, should_retry_again

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 5  # tries of one whole commit on transient errors no backend has retried already
RETRY_MAX_WAIT_S = 60.0  # longest wait between two tries of a whole commit


class Snapshot(Protocol):
    """A checkpoint's tensors and meta, already copied out of the live training state."""

    nbytes: int  # size of the tensors, for the CheckpointStaged event

    def write(self, directory: Path) -> dict:
        """Write the tensor files into `directory`; return the JSON meta (as `stage`'s `write`)."""
        ...


@dataclass(frozen=True)
class Staged:
    step: int
    dir: Path
    bytes: int  # total size of the folder, COMMIT.json included (before a snapshot is written: its tensors' size)
    stage_s: float  # seconds the (blocking) staging took
    snapshot: Snapshot | None = field(default=None, repr=False, compare=False)  # still to be written to `dir`
    state: RunState | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Restored:
    step: int
    dir: Path  # local copy, verified against its COMMIT.json
    meta: dict  # COMMIT.json's meta
    state: RunState | None  # parsed from meta["state"] when the checkpoint carries one


class CheckpointManager:
    """Checkpoints of `run` in `storage`, staged under `workdir`. One background upload worker."""

    def __init__(
        self,
        storage: Storage,
        run: str,
        workdir: Path,
        *,
        keep: int,
        bus: events.EventBus | None = None,
        clock: Clock | None = None,
        upload_attempts: int = UPLOAD_ATTEMPTS,
    ) -> None:
        if keep < 1:
            raise ProfileError(f"must be at least 1, got {keep}", key="checkpoint.keep")
        self.storage = storage
        self.run = run
        self.workdir = Path(workdir)
        self.keep = keep
        self.bus = bus or events.EventBus()
        self.clock = clock or SystemClock()
        self.upload_attempts = upload_attempts
        self.last_committed: int | None = None  # newest step this manager committed or restored
        self.last_error: str | None = None  # why the most recent upload failed, until one succeeds
        self._cond = threading.Condition()
        self._waiting: Staged | None = None
        self._uploading: Staged | None = None
        self._crash: BaseException | None = None
        self._closed = False
        self._worker: threading.Thread | None = None
        self._warned_uncommitted = False

    @property
    def prefix(self) -> str:
        return f"{self.run}/{CHECKPOINT_DIR}"

    def folder(self, step: int) -> str:
        return f"{self.prefix}/{step_dir_name(step)}"

    # ---- staging (caller's thread) -------------------------------------------------------------

    def stage(self, step: int, write: Callable[[Path], dict], state: RunState | None = None) -> Staged:
        """Write checkpoint `step` to workdir/staging/ and its manifest; no network.

        `write(dir)` writes the tensor files and returns JSON meta. COMMIT.json's meta is that
        meta plus "step"; given `state`, also "state" (the RunState with this step and
        trainer=meta), which is written as state.json too and comes back as Restored.state.
        """
        t0 = self.clock.monotonic()
        folder = self._claim(step)
        size = self._write_folder(step, folder, write, state)
        staged = Staged(step, folder, size, self.clock.monotonic() - t0)
        self.bus.emit(events.CheckpointStaged(step, size, staged.stage_s))
        return staged

    def stage_snapshot(self, step: int, take: Callable[[], Snapshot], state: RunState | None = None) -> Staged:
        """Take checkpoint `step`'s snapshot now (`take()`, the only part that blocks the caller).

        Writing it to workdir/staging/ and hashing it, as `stage` does, is left to the worker,
        before the upload. If that write fails (a full local disk), the caller's next `check`,
        `submit` or `wait` raises the StorageError.
        """
        t0 = self.clock.monotonic()
        folder = self._claim(step)
        snapshot = take()
        staged = Staged(step, folder, snapshot.nbytes, self.clock.monotonic() - t0, snapshot=snapshot, state=state)
        self.bus.emit(events.CheckpointStaged(step, snapshot.nbytes, staged.stage_s))
        return staged

    def _claim(self, step: int) -> Path:
        """The staging folder of `step`, after making sure no upload of the same step is in the way."""
        with self._cond:
            if self._uploading is not None and self._uploading.step == step:
                raise RelayError(f"checkpoint step {step} is still uploading; cannot stage it again now")
            if self._waiting is not None and self._waiting.step == step:
                self._waiting = None  # about to be rewritten; the caller submits the new one
        return self.workdir / "staging" / step_dir_name(step)

    def _write_folder(self, step: int, folder: Path, write: Callable[[Path], dict], state: RunState | None) -> int:
        """Write the files, state.json and COMMIT.json of `step` into `folder`; its size in bytes."""
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
            written = write(folder) or {}
        except OSError as exc:  # a full local disk, most often: say where, keep what is committed
            shutil.rmtree(folder, ignore_errors=True)
            raise StorageError(
                f"could not stage checkpoint step {step} in {folder}: {exc.strerror or exc}",
                hint="free local disk space (the workdir holds the cache and staging); "
                "the last committed checkpoint is intact: run the same command again",
            ) from exc
        meta: dict = {**written, "step": step}
        if state is not None:
            state = dataclasses.replace(state, step=step, trainer=written)
            (folder / STATE_FILE).write_text(state.to_json())
            meta["state"] = state.to_dict()
        write_manifest(folder, meta, clock=self.clock)
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    # ---- background upload -------------------------------------------------------------------

    def submit(self, staged: Staged) -> None:
        """Queue `staged` for upload and return at once; replaces a checkpoint still waiting."""
        with self._cond:
            self._raise_crash()
            if self._closed:
                raise RelayError("checkpoint manager is closed; cannot submit")
            replaced, self._waiting = self._waiting, staged
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="relay-upload", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        if replaced is not None and replaced.step != staged.step:
            log.info("checkpoint step %d superseded by step %d before its upload began", replaced.step, staged.step)
            shutil.rmtree(replaced.dir, ignore_errors=True)

    def check(self) -> None:
        """Raise what stopped the worker, if anything has (a snapshot that could not be written)."""
        with self._cond:
            self._raise_crash()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until no upload is waiting or running. Re-raises a crashed worker.

        True when idle and the last upload committed; False on timeout or when the last upload
        failed (UploadFailed was emitted, `last_error` says why, the local copy is kept).
        """
        with self._cond:
            idle = self._cond.wait_for(lambda: self._waiting is None and self._uploading is None, timeout_s)
            self._raise_crash()
            return idle and self.last_error is None

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish pending uploads and stop the worker; False if they did not finish in time."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s)
            return not self._worker.is_alive()
        return True

    def _raise_crash(self) -> None:
        if self._crash is not None:
            crash, self._crash = self._crash, None
            raise crash

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                job, self._waiting, self._uploading = self._waiting, None, self._waiting
            crash = None
            try:
                t0 = self.clock.monotonic()
                if job.snapshot is not None:
                    job = self._write_snapshot(job)
                self._upload(job, t0)
            except (StorageError, LeaseHeld, LeaseLapsed) as exc:  # not staged, or the fence refused: the caller's
                log.warning("%s", exc)  # next call raises it (the staged folder stays on local disk)
                crash = exc
            except Exception as exc:  # the thread boundary: hand an unexpected error to the caller
                log.exception("upload worker failed on step %d", job.step)
                crash = exc
            with self._cond:
                self._crash = self._crash or crash
                self._uploading = None
                self._cond.notify_all()

    def _write_snapshot(self, job: Staged) -> Staged:
        assert job.snapshot is not None
        size = self._write_folder(job.step, job.dir, job.snapshot.write, job.state)
        return Staged(job.step, job.dir, size, job.stage_s)

    def _upload(self, staged: Staged, t0: float) -> None:
        """Commit `staged`; its upload time counts from `t0` (the worker's start on it, writing included)."""
        try:
            self._with_retry(lambda: self._commit_and_verify(staged, self.clock.monotonic()))
        except (StorageError, CheckpointCorrupt, OSError) as exc:
            self.last_error = str(exc)
            log.warning("upload of checkpoint step %d failed: %s (local copy kept in %s)", staged.step, exc, staged.dir)
            self.bus.emit(events.UploadFailed(staged.step, str(exc), str(staged.dir)))
            return
        upload_s = self.clock.monotonic() - t0
        self.last_error = None
        self.last_committed = max(self.last_committed or 0, staged.step)
        self.bus.emit(events.CheckpointCommitted(staged.step, staged.bytes, upload_s))
        self._rotate(staged.step)
        self._drop_staged_up_to(staged.step)

    def _with_retry(self, commit: Callable[[], None]) -> None:
        """Retry a whole commit, but only on errors no backend has retried already: one operation is
        retried at one layer (runner.storage.retry), so a Drive outage costs 8 tries, not 8 × 5."""

        def on_retry(error: BaseException, attempt: int, wait_s: float) -> None:
            self.bus.emit(events.Warning(f"checkpoint upload: {error}; retrying", kind="retry"))

        wait_s = RETRY_MAX_WAIT_S
        policy = RetryPolicy(
            attempts=self.upload_attempts, max_s=wait_s, initial_s=min(1.0, wait_s), jitter_s=min(1.0, wait_s)
        )
        call_with_retry(commit, policy=policy, clock=self.clock, retry_if=should_retry_again, on_retry=on_retry)

    def _commit_and_verify(self, staged: Staged, t0: float) -> None:
        def progress(done: int, total: int) -> None:
            elapsed = max(self.clock.monotonic() - t0, 1e-9)
            self.bus.emit(events.UploadProgress(staged.step, done, total, done / elapsed))

        prefix = self.folder(staged.step)
        atomic = capability(self.storage, AtomicFolders) is not None  # files and marker land together
        if not atomic and self.storage.exists(f"{prefix}/{COMMIT}"):
            # Re-committing a step (e.g. after resuming past a corrupt copy of it): retract the old
            # marker first, so it never vouches for a mix of old and new files.
            self.storage.delete(f"{prefix}/{COMMIT}")
        manifest = commit_folder(self.storage, staged.dir, prefix, progress=progress)
        listed = {key.rsplit("/", 1)[-1] for key in self.storage.list(prefix)}
        absent = [
            n for n in [*manifest["files"], COMMIT] if n not in listed and not self.storage.exists(f"{prefix}/{n}")
        ]
        if absent:
            raise StorageError(
                f"{self.storage.url}/{prefix}: {', '.join(absent)} not found right after upload",
                key=prefix,
                transient=True,
            )

    # ---- rotation ----------------------------------------------------------------------------

    def _rotate(self, committed: int) -> None:
        """Keep `committed` and the keep-1 newest committed steps below it; delete older ones.

        Folders above `committed` are left alone (leftovers of a session that resumed from an
        older checkpoint; they are replaced when training reaches them again).
        """
        try:
            folders = step_folders(self.storage, self.prefix)
            older = sorted((s for s, names in folders.items() if s < committed and COMMIT in names), reverse=True)
            doomed = set(older[self.keep - 1 :])
            doomed |= {s for s, names in folders.items() if s < committed and COMMIT not in names}  # orphans
            for step in sorted(doomed):
                self._delete_folder(step, folders[step])
        except StorageError as exc:
            log.warning("rotation after step %d failed: %s", committed, exc)
            self.bus.emit(events.Warning(f"could not delete old checkpoints: {exc}", kind="upload"))

    def _delete_folder(self, step: int, names: set[str]) -> None:
        prefix = self.folder(step)
        folders = capability(self.storage, AtomicFolders)
        if folders is not None:  # one atomic commit (the Hub): never half deleted
            folders.delete_folder(prefix)
            log.info("deleted checkpoint step %d", step)
            return
        if COMMIT in names:
            self.storage.delete(f"{prefix}/{COMMIT}")  # first: a half-deleted folder is never "committed"
        for name in sorted(names - {COMMIT}):
            self.storage.delete(f"{prefix}/{name}")
        log.info("deleted checkpoint step %d", step)

    def _drop_staged_up_to(self, step: int) -> None:
        staging = self.workdir / "staging"
        if not staging.is_dir():
            return
        with self._cond:
            pending = {s.step for s in (self._waiting,) if s is not None}
        for folder in staging.iterdir():
            folder_step = step_of_dir(folder.name)
            if folder_step is not None and folder_step <= step and folder_step not in pending:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- listing and restore -----------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Steps whose folder has a COMMIT.json, ascending (not verified: `latest` verifies)."""
        return committed_steps(self.storage, self.run)

    def latest(self, local_dir: Path) -> Restored | None:
        """Fetch the newest committed checkpoint that verifies into local_dir/step-N; None if there is none."""
        folders = step_folders(self.storage, self.prefix)
        uncommitted = sorted(s for s, names in folders.items() if COMMIT not in names)
        if uncommitted:
            log.debug("ignoring checkpoint folders without COMMIT.json: %s", uncommitted)
            if not self._warned_uncommitted:
                self._warned_uncommitted = True
                why = f"ignored unfinished checkpoint uploads (no COMMIT.json) at steps {uncommitted}"
                self.bus.emit(events.Warning(why, kind="checkpoint"))
        for step in sorted((s for s in folders if s not in uncommitted), reverse=True):
            restored = self._try_restore(step, Path(local_dir) / step_dir_name(step))
            if restored is not None:
                self.last_committed = step
                return restored
        return None

    def _try_restore(self, step: int, dest: Path) -> Restored | None:
        shutil.rmtree(dest, ignore_errors=True)
        try:
            manifest = fetch_folder(self.storage, self.folder(step), dest)
            state = _state_of(manifest["meta"], f"{self.storage.url}/{self.folder(step)}")
        except CheckpointCorrupt as exc:
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("checkpoint step %d unusable: %s", step, exc)
            why = f"checkpoint step {step} is unusable ({exc}); trying an older one"
            self.bus.emit(events.Warning(why, kind="checkpoint"))
            return None
        return Restored(step, dest, manifest["meta"], state)


def _state_of(meta: dict, where: str) -> RunState | None:
    """The RunState in a checkpoint's meta: an object (stage(state=…)) or a JSON string (a writer's own)."""
    data = meta.get("state")
    if data is None:
        return None
    if isinstance(data, str):
        return RunState.from_json(data, source=where)
    return RunState.from_dict(data, source=where)
