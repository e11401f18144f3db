"""The training dashboard: events in, a view out.

Owns: `Snapshot` (everything the view shows), the pure reducer `apply(snapshot,
event)`, the pure views `render(snapshot, now)` (a rich renderable) and
`plain_line(snapshot, now)` (one log line), and `Dashboard`, which subscribes
to the EventBus and draws either a rate-limited `rich.live.Live` (terminal,
Jupyter) or a plain line every few seconds (background runs, CI, log files).

While the live view is up, Python warnings and library log records go into its
"warnings" section instead of the terminal: text written under a redrawing
panel leaves stale copies of it above. They are put back when it stops. A
session that fails is shown ending with the code the command returns
(runner.errors.exit_code_for), whatever its last event said.

Must not: read anything but events (the session's budget arrives as BudgetUpdated,
so a dashboard replayed from the events log shows it too); import torch; slow training down (events only update
the snapshot; drawing is rate-limited and its cost is measured in
`render_seconds_total`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runner import events as ev
from runner import humanize
from runner.clock import Clock
from runner.errors import end_reason_for, exit_code_for
from runner.profile import VARIANT_SEPARATOR, Profile

LOSS_HISTORY = 40  # losses kept for the sparkline
WARNINGS_KEPT = 5  # distinct warning kinds shown, most recent last
HISTORY_SHOWN = 5  # earlier sessions shown
EMA_LOSS = 0.05  # smoothing of the loss EMA (weight of the newest value)
EMA_STEP_S = 0.1  # smoothing of seconds per step
SPARK = "▁▂▃▄▅▆▇█"
# Set in the environment of a notebook kernel's children: Colab, Kaggle, any jupyter_client-launched kernel.
NOTEBOOK_MARKERS = ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "JPY_PARENT_PID")
# Events worth a plain line at once, not only every `plain_every_s`.
# SessionEnded is printed by stop(), which knows whether the session failed (and so the exit code).
IMPORTANT = (ev.SessionStarted, ev.CheckpointCommitted, ev.UploadFailed, ev.Warning, ev.Planned)
# Earlier sessions recorded as "running" in a checkpoint ended without saying how (killed, disconnected).
UNRECORDED_END = "killed"


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


# ---- formatting helpers (pure) ----


def sparkline(values: tuple[float, ...] | list[float]) -> str:
    """One block character per value, scaled between the min and max of `values`."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span <= 0:
        return SPARK[len(SPARK) // 2] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


format_duration = humanize.duration  # 12 s · 4 min · 2 h 05 min


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def eta_seconds(s: Snapshot) -> float | None:
    """Seconds of training left at the current pace, or None before the first step."""
    if s.step_s is None or s.target <= 0:
        return None
    return max(0, s.target - s.step) * s.step_s


def time_left(s: Snapshot, now: float) -> float | None:
    return None if s.time_left_s is None else max(0.0, s.time_left_s - (now - s.budget_at))


def eta_text(s: Snapshot, now: float) -> str:
    """'ETA 12 min · this session' or 'ETA 30 h · about 3 sessions' (counting this one)."""
    eta = eta_seconds(s)
    text = humanize.eta(eta)
    left = time_left(s, now)
    if eta is None or left is None or not s.session_length_s:
        return text
    if eta <= left:
        return f"{text} · this session"
    sessions = 1 + humanize.sessions_for((eta - left) / 3600, s.session_length_s / 3600)
    return f"{text} · about {sessions} sessions"


def _rate_text(s: Snapshot) -> str:
    if not s.step_s:
        return "— s/step"
    return f"{1 / s.step_s:.2f} steps/s · {s.step_s:.2f} s/step"


def _loss_text(s: Snapshot) -> str:
    if s.loss is None:
        return "loss —"
    return f"loss {s.loss:.4f} · ema {s.loss_ema:.4f}"


def _budget_text(s: Snapshot, now: float) -> str:
    left = time_left(s, now)
    parts = ["session left " + ("—" if left is None else format_duration(left))]
    if s.next_checkpoint_in_s is not None:
        due = max(0.0, s.next_checkpoint_in_s - (now - s.budget_at))
        parts.append(f"next checkpoint in {format_duration(due)}")
    return " · ".join(parts)


def _checkpoint_text(s: Snapshot, now: float) -> str:
    if s.checkpoint_step is None:
        text = "none yet"
    else:
        ago = format_duration(now - s.checkpoint_at) if s.checkpoint_at is not None else "?"
        size = format_bytes(s.checkpoint_bytes)
        text = f"step {s.checkpoint_step} · {size} in {s.checkpoint_upload_s:.0f} s · {ago} ago"
    return text


def _upload_text(u: ev.UploadProgress) -> str:
    pct = 100 * u.done_bytes / u.total_bytes if u.total_bytes else 0
    done, total = format_bytes(u.done_bytes), format_bytes(u.total_bytes)
    return f"step {u.step}: {done} / {total} ({pct:.0f}%) at {format_bytes(u.rate_bps)}/s"


def _vram_text(s: Snapshot) -> str:
    if s.vram_used_gib is None:
        return "—"
    peak = f" · peak {s.vram_peak_gib:.1f} GiB" if s.vram_peak_gib is not None else ""
    return f"{s.vram_used_gib:.1f} GiB{peak}"


def _session_row(entry: Mapping) -> str:
    """One sessions.jsonl entry; keys are read leniently (platform, gpu, step_from/step_to or steps, reason)."""
    steps = entry.get("steps")
    for first, last in (("step_from", "step_to"), ("start_step", "end_step")):
        if first in entry and last in entry:
            steps = f"{entry[first]}→{entry[last]}"
            break
    how = entry.get("reason", entry.get("ended", "?"))
    how = UNRECORDED_END if how == "running" else how  # an earlier session cannot be running now
    return f"{entry.get('platform', '?')} {entry.get('gpu', '?')} · steps {steps if steps is not None else '?'} · {how}"


# ---- views (pure) ----


def render(snapshot: Snapshot, now: float) -> RenderableType:
    """The dashboard as a rich renderable. Pure: the same snapshot and `now` give the same output."""
    s = snapshot
    pct = 100 * s.step / s.target if s.target else 0.0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    progress = f"step {s.step} / {s.target} ({pct:.1f}%) · {eta_text(s, now)}" if s.target else "starting…"
    grid.add_row("progress", progress)
    grid.add_row("", ProgressBar(total=max(1, s.target), completed=s.step, width=60))
    grid.add_row("loss", f"{_loss_text(s)} {sparkline(s.losses)}")
    grid.add_row("speed", _rate_text(s) + (f" · lr {s.lr:.2e}" if s.lr is not None else ""))
    grid.add_row("budget", _budget_text(s, now))
    grid.add_row("gpu mem", _vram_text(s))
    grid.add_row("checkpoint", _checkpoint_text(s, now))
    if s.upload is not None:
        grid.add_row("upload", _upload_text(s.upload))
    if s.val_loss is not None:
        grid.add_row("validation", f"val loss {s.val_loss:.4f} at step {s.val_step}")
    rows = (("plan", s.plan), ("cache", s.cache), ("sample", s.sample_path), ("stopping", s.stopping),
            ("ended", s.ended))  # fmt: skip
    for label, value in rows:
        if value:
            grid.add_row(label, value)
    parts: list[RenderableType] = [grid]
    if s.history or s.platform:
        parts.append(_history_table(s))
    if s.warnings:
        parts.append(_warnings_text(s))
    title = f"relay · {s.run or 'run'} · {s.platform or '?'} {s.gpu}".rstrip()
    return Panel(Group(*parts), title=title, title_align="left")


def _history_table(s: Snapshot) -> Text:
    lines = [f"#{i} {_session_row(h)}" for i, h in enumerate(s.history, 1)][-HISTORY_SHOWN:]
    now_row = f"{s.platform} {s.gpu} · steps {s.session_start_step}→{s.step} · {s.ended or 'running'}"
    lines.append(f"#{len(s.history) + 1} {now_row}")
    return Text("sessions\n" + "\n".join("  " + line for line in lines))


def _warnings_text(s: Snapshot) -> Text:
    lines = [f"  {w.kind} ×{w.count}: {w.message}" for w in s.warnings]
    return Text("warnings\n" + "\n".join(lines), style="yellow")


def plain_line(snapshot: Snapshot, now: float) -> str:
    """One line for logs: step, loss, pace, ETA, memory, checkpoint, budget. Pure."""
    s = snapshot
    if not s.target:  # before SessionStarted: only the plan or the cache build is known
        return "relay | starting" + "".join(f" | {v}" for v in (s.plan, s.cache and f"cache {s.cache}") if v)
    pct = 100 * s.step / s.target
    parts = [f"step {s.step}/{s.target} ({pct:.1f}%)", _loss_text(s), _rate_text(s), eta_text(s, now)]
    if s.vram_used_gib is not None:
        parts.append(f"vram {_vram_text(s)}")
    if s.checkpoint_step is not None:
        parts.append(f"ckpt step {s.checkpoint_step}")
    if s.upload is not None:
        parts.append(f"uploading {format_bytes(s.upload.done_bytes)}/{format_bytes(s.upload.total_bytes)}")
    if s.time_left_s is not None:
        parts.append(_budget_text(s, now))
    if s.skipped_steps:
        parts.append(f"skipped {s.skipped_steps}")
    if s.ended:
        parts.append(f"ended: {s.ended}")
    variant = (s.run or "").partition(VARIANT_SEPARATOR)[2]  # an experiment's run EXP--VARIANT: name the variant
    return "relay | " + (f"variant {variant} | " if variant else "") + " | ".join(parts)


def should_use_live(console: Console, env: Mapping[str, str]) -> bool:
    """Live view in a real terminal or a Jupyter cell; plain lines elsewhere.

    A `!relay train` in a notebook is a child process on a pseudo-terminal whose output the notebook
    shows as text: cursor movement would repeat the panel, so it gets plain lines. Such a child
    inherits one of NOTEBOOK_MARKERS. A Kaggle "Save & Run All" (batch) run is read later as a log.
    """
    if env.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return False
    if console.is_jupyter:
        return True
    under_notebook = any(marker in env for marker in NOTEBOOK_MARKERS)
    return console.is_terminal and not console.is_dumb_terminal and not under_notebook


@dataclass
class Dashboard:
    """Subscribes to the EventBus and shows the run; see the module docstring.

    Use as a context manager (or call start/stop) around the session; `attach(bus)` subscribes.
    """

    console: Console
    clock: Clock
    live: bool | None = None  # None: decide with should_use_live(console, env)
    plain_every_s: float = 30.0
    refresh_per_s: float = 2.0
    env: Mapping[str, str] = field(default_factory=dict)
    snapshot: Snapshot = field(default_factory=Snapshot)
    render_seconds_total: float = 0.0
    _live: Live | None = field(default=None, repr=False)
    _last_plain: float | None = field(default=None, repr=False)
    _printed: Snapshot | None = field(default=None, repr=False)
    _ended_shown: str = field(default="", repr=False)  # the "ended: …" already printed: a plain run says it once
    _capture: _OutputCapture | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = should_use_live(self.console, self.env)

    @classmethod
    def for_terminal(
        cls, clock: Clock, *, plain: bool = False, profile: Profile | None = None, console: Console | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Dashboard:  # fmt: skip
        """The CLI's dashboard on stdout: settings from profile.dashboard, live unless `plain` or not a terminal.

        env None reads the process environment (this is the CLI edge)."""
        env = dict(os.environ) if env is None else env
        dash = cls(
            console or Console(), clock, live=False if plain else None, env=env,
            plain_every_s=profile.dashboard.plain_every_s if profile else 30.0,
            refresh_per_s=profile.dashboard.refresh_per_s if profile else 2.0,
        )  # fmt: skip
        if profile is not None and profile.session.hours > 0:
            dash.snapshot = dataclasses.replace(dash.snapshot, session_length_s=profile.session.hours * 3600)
        return dash

    def attach(self, bus: ev.EventBus) -> None:
        bus.subscribe(self.on_event)

    def on_event(self, event: ev.Event) -> None:
        now = self.clock.monotonic()
        self.snapshot = apply(self.snapshot, event, now)
        if isinstance(event, ev.Notice):
            self._print(f"relay | {event.message}")
        if self.live:
            return  # the Live thread redraws at its own rate; nothing to do on the training thread
        if isinstance(event, ev.Warning):
            self._print(f"relay | warning ({event.kind}): {event.message}")
        elif isinstance(event, ev.UploadFailed):
            self._print(f"relay | warning (upload): {self.snapshot.warnings[-1].message}")
        if isinstance(event, IMPORTANT) and not isinstance(event, (ev.Warning, ev.UploadFailed)):
            self._print_status(now)
        elif self._last_plain is None or now - self._last_plain >= self.plain_every_s:
            self._print_status(now)

    def start(self) -> None:
        if self.live and self._live is None:
            self._live = Live(
                console=self.console, get_renderable=self._timed_render, refresh_per_second=self.refresh_per_s,
                auto_refresh=True,  # stray prints and warnings go above the panel (rich redirects them)
            )  # fmt: skip
            self._capture = _OutputCapture(self.on_event)
            self._capture.start()
            self._live.start(refresh=True)

    def stop(self, error: BaseException | None = None) -> None:
        """Draw the final state (with `error`, the exception the session failed with: its exit code) and let go."""
        if error is not None:
            self.snapshot = ended_by(self.snapshot, error)
        if self._live is not None:
            self._live.stop()  # draws the final state once more
            self._live = None
            self._capture.stop()
            self._capture = None
        elif not self.live and self._printed is not self.snapshot:
            self._print_status(self.clock.monotonic())

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.stop(exc)

    def _timed_render(self) -> RenderableType:
        t0 = time.perf_counter()  # measuring our own cost, not deciding anything: no Clock needed
        out = render(self.snapshot, self.clock.monotonic())
        self.render_seconds_total += time.perf_counter() - t0
        return out

    def _print_status(self, now: float) -> None:
        self._last_plain = now
        self._printed = self.snapshot
        if self.snapshot.ended and self.snapshot.ended == self._ended_shown:
            return  # events after the end (the supervisor's exit record) change nothing a user reads
        self._ended_shown = self.snapshot.ended
        self._print(plain_line(self.snapshot, now))

    def _print(self, line: str) -> None:
        t0 = time.perf_counter()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.render_seconds_total += time.perf_counter() - t0


class _OutputCapture:
    """While the live view is up: Python warnings and log records that would be written to the terminal
    become Warning events (shown in the panel's "warnings" section); `stop()` puts everything back.

    Log handlers that write to stdout/stderr are taken off their loggers and one capturing handler is put
    in their place; records that several loggers would print are counted once."""

    def __init__(self, emit: Callable[[ev.Event], None]) -> None:
        self.emit = emit
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._added: list[logging.Logger] = []
        self._handler = _EventLogHandler(emit)
        self._showwarning = None

    def start(self) -> None:
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._on_warning
        loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]  # fmt: skip
        for logger in loggers:
            terminal = [h for h in logger.handlers if _writes_to_terminal(h)]
            for handler in terminal:
                logger.removeHandler(handler)
                self._removed.append((logger, handler))
            if terminal or logger is logging.getLogger():
                logger.addHandler(self._handler)
                self._added.append(logger)

    def stop(self) -> None:
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
            self._showwarning = None
        for logger in self._added:
            logger.removeHandler(self._handler)
        for logger, handler in self._removed:
            logger.addHandler(handler)
        self._added, self._removed = [], []

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        self.emit(ev.Warning(f"{message}", kind=getattr(category, "__name__", "warning")))


def _writes_to_terminal(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return handler.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


class _EventLogHandler(logging.Handler):
    """Log records at WARNING and above as Warning events; runner.signals' records are the stop acknowledgement."""

    def __init__(self, emit: Callable[[ev.Event], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.emit_event = emit

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "relay_shown", False):
            return  # already shown through another logger's handler
        record.relay_shown = True
        try:
            message = record.getMessage().splitlines()[0] if record.getMessage() else record.msg
        except Exception:  # a bad format string in a library's log call must not stop training
            message = str(record.msg)
        kind = "signal" if record.name == "runner.signals" else record.name.split(".")[0] or "log"
        self.emit_event(ev.Warning(str(message), kind=kind))
