"""The dashboard's model: everything a view shows, built from events alone.

Owns: `Snapshot`, the pure reducer `apply(snapshot, event, now)` and `ended_by(snapshot, exc)` (a failed
session ends with the code the command returns, runner.errors.exit_code_for, whatever its last event said).

Must not: read anything but events (the session's budget arrives as BudgetUpdated, so a snapshot replayed
from the events log shows it too); draw anything (runner.dashview); import rich or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from runner import events as ev
from runner.errors import end_reason_for, exit_code_for

LOSS_HISTORY = 40  # losses kept for the sparkline
WARNINGS_KEPT = 5  # distinct warning kinds shown, most recent last
EMA_LOSS = 0.05  # smoothing of the loss EMA (weight of the newest value)
EMA_STEP_S = 0.1  # smoothing of seconds per step


@dataclass(frozen=True)
class WarningLine:
    kind: str
    message: str  # the latest message of this kind
    count: int


@dataclass(frozen=True)
class Snapshot:
    """What the dashboard shows. Times are monotonic seconds (the Clock's)."""

    run: str = ""
    platform: str = ""
    gpu: str = ""
    step: int = 0
    target: int = 0
    session_start_step: int = 0
    loss: float | None = None
    loss_ema: float | None = None
    losses: tuple[float, ...] = ()
    lr: float | None = None
    step_s: float | None = None  # smoothed seconds per optimizer step
    skipped_steps: int = 0
    vram_used_gib: float | None = None
    vram_peak_gib: float | None = None
    plan: str = ""
    cache: str = ""
    val_loss: float | None = None
    val_step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_bytes: int = 0
    checkpoint_upload_s: float = 0.0
    checkpoint_at: float | None = None
    upload: ev.UploadProgress | None = None
    sample_path: str = ""
    history: tuple[dict, ...] = ()
    warnings: tuple[WarningLine, ...] = ()
    ended: str = ""  # why the session ended; empty while running
    stopping: str = ""  # the acknowledgement of a stop request (Ctrl-C, SIGTERM), shown until the end
    # From the session's BudgetUpdated events: seconds as of `budget_at`.
    time_left_s: float | None = None
    next_checkpoint_in_s: float | None = None
    session_length_s: float | None = None
    budget_at: float = 0.0


def apply(snapshot: Snapshot, event: ev.Event, now: float = 0.0) -> Snapshot:
    """The snapshot after `event` (received at monotonic time `now`). Pure; unknown events change nothing."""
    handler = _HANDLERS.get(type(event))
    return handler(snapshot, event, now) if handler else snapshot


def _on_started(s: Snapshot, e: ev.SessionStarted, now: float) -> Snapshot:
    time_left = s.time_left_s if e.deadline_s is None else e.deadline_s
    length = s.session_length_s or e.deadline_s
    return dataclasses.replace(
        s, run=e.run, platform=e.platform, gpu=e.gpu, step=e.step, target=e.target, session_start_step=e.step,
        history=tuple(e.history), ended="", time_left_s=time_left, session_length_s=length, budget_at=now,
    )  # fmt: skip


def _on_step(s: Snapshot, e: ev.StepDone, now: float) -> Snapshot:
    changes: dict = {"step": e.step, "target": e.target, "lr": e.lr}
    changes["step_s"] = e.step_s if s.step_s is None else s.step_s + EMA_STEP_S * (e.step_s - s.step_s)
    if e.vram_used_gib is not None:
        changes["vram_used_gib"] = e.vram_used_gib
    if e.vram_peak_gib is not None:
        changes["vram_peak_gib"] = max(e.vram_peak_gib, s.vram_peak_gib or 0.0)
    if e.skipped:
        changes["skipped_steps"] = s.skipped_steps + 1
        changes["warnings"] = _add_warning(s.warnings, "nan", f"non-finite loss at step {e.step}: update skipped")
    else:
        changes["loss"] = e.loss
        changes["loss_ema"] = e.loss if s.loss_ema is None else s.loss_ema + EMA_LOSS * (e.loss - s.loss_ema)
        changes["losses"] = (*s.losses[-(LOSS_HISTORY - 1) :], e.loss)
    return dataclasses.replace(s, **changes)


def _on_committed(s: Snapshot, e: ev.CheckpointCommitted, now: float) -> Snapshot:
    upload = None if s.upload is None or s.upload.step == e.step else s.upload
    return dataclasses.replace(
        s, checkpoint_step=e.step, checkpoint_bytes=e.bytes, checkpoint_upload_s=e.upload_s, checkpoint_at=now,
        upload=upload,
    )  # fmt: skip


def _on_upload_failed(s: Snapshot, e: ev.UploadFailed, now: float) -> Snapshot:
    message = f"upload of step {e.step} failed ({e.error}); local copy: {e.local_copy}"
    return dataclasses.replace(s, upload=None, warnings=_add_warning(s.warnings, "upload", message))


def _on_planned(s: Snapshot, e: ev.Planned, now: float) -> Snapshot:
    gc = "on" if e.gradient_checkpointing else "off"
    plan = f"micro-batch {e.micro_batch} × accum {e.grad_accum}, grad checkpointing {gc}"
    return dataclasses.replace(s, plan=f"{plan} ({e.reason})" if e.reason else plan)


def _on_ended(s: Snapshot, e: ev.SessionEnded, now: float) -> Snapshot:
    return dataclasses.replace(s, step=e.step, target=e.target, ended=f"{e.reason} (exit {e.exit_code})")


def _add_warning(warnings: tuple[WarningLine, ...], kind: str, message: str) -> tuple[WarningLine, ...]:
    """Keep the latest message and a count per kind; the most recent kinds last."""
    count = next((w.count for w in warnings if w.kind == kind), 0)
    kept = tuple(w for w in warnings if w.kind != kind)
    return (*kept, WarningLine(kind, message, count + 1))[-WARNINGS_KEPT:]


_HANDLERS: dict[type, Callable[[Snapshot, object, float], Snapshot]] = {
    ev.SessionStarted: _on_started,
    ev.StepDone: _on_step,
    ev.CheckpointCommitted: _on_committed,
    ev.UploadFailed: _on_upload_failed,
    ev.Planned: _on_planned,
    ev.SessionEnded: _on_ended,
    ev.Validated: lambda s, e, now: dataclasses.replace(s, val_loss=e.val_loss, val_step=e.step),
    ev.UploadProgress: lambda s, e, now: dataclasses.replace(s, upload=e),
    ev.CacheProgress: lambda s, e, now: dataclasses.replace(s, cache=f"{e.what} {e.done}/{e.total}"),
    ev.SampleSaved: lambda s, e, now: dataclasses.replace(s, sample_path=e.path),
    ev.Warning: lambda s, e, now: _on_warning(s, e, now),
    ev.BudgetUpdated: lambda s, e, now: dataclasses.replace(
        s, time_left_s=e.time_left_s, next_checkpoint_in_s=e.next_checkpoint_in_s, budget_at=now
    ),
}


def _on_warning(s: Snapshot, e: ev.Warning, now: float) -> Snapshot:
    stopping = e.message if e.kind == "signal" and not s.stopping else s.stopping
    return dataclasses.replace(s, warnings=_add_warning(s.warnings, e.kind, e.message), stopping=stopping)


def ended_by(s: Snapshot, exc: BaseException) -> Snapshot:
    """The snapshot of a session that failed with `exc`: its end shows the code the command returns."""
    return dataclasses.replace(s, ended=f"{end_reason_for(exc)} (exit {exit_code_for(exc)})")
