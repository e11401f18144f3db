"""The training dashboard: events in, a view out.

Owns: `Dashboard`, which subscribes to the EventBus, folds each event into its `Snapshot`
(runner.snapshot) and draws either a rate-limited `rich.live.Live` (terminal, Jupyter) or a plain line
every few seconds (background runs, CI, log files) with the pure views of runner.dashview; and
`should_use_live`, the choice between the two.

While the live view is up, Python warnings and library log records go into its
"warnings" section instead of the terminal: text written under a redrawing
panel leaves stale copies of it above. They are put back when it stops. A
session that fails is shown ending with the code the command returns
(runner.errors.exit_code_for), whatever its last event said.

Must not: read anything but events; import torch; slow training down (events only update
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

from rich.console import Console, RenderableType
from rich.live import Live

from runner import events as ev
from runner.clock import Clock
from runner.dashview import plain_line, render
from runner.profile import Profile
from runner.snapshot import Snapshot, apply, ended_by

# Set in the environment of a notebook kernel's children: Colab, Kaggle, any jupyter_client-launched kernel.
NOTEBOOK_MARKERS = ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "JPY_PARENT_PID")
# Events worth a plain line at once, not only every `plain_every_s`.
# SessionEnded is printed by stop(), which knows whether the session failed (and so the exit code).
IMPORTANT = (ev.SessionStarted, ev.CheckpointCommitted, ev.UploadFailed, ev.Warning, ev.Planned)


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
