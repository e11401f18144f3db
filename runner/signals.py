"""Stop requests from signals: SIGTERM and Ctrl-C.

Owns: `StopFlag` and `install_stop_handlers()`. SIGTERM and the first SIGINT ask
the session to stop after the current optimizer step (it then commits a
checkpoint and exits 75). A second SIGINT means "stop now": the flag's
`stop_now` is set and `Interrupted` is raised where the main thread is, so the
session leaves at once without committing anything new. Nothing is ever left
half-committed, since a checkpoint exists only once its COMMIT.json is written,
last. On exit the previous handlers come back (a notebook kernel keeps its own).

Must not: decide anything else or act on storage; the session reads the flag.
Handlers can only be installed from the main thread; elsewhere the flag is
returned unhooked, with a warning.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from runner.errors import Interrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopFlag:
    """Set by the signal handlers, read by the training loop between steps."""

    requested: bool = False
    """Stop after the current step and commit a final checkpoint."""
    stop_now: bool = False
    """Stop at once; commit nothing new (a second Ctrl-C)."""
    reason: str = ""
    """The signal that asked, e.g. "SIGTERM"."""
    interrupts: int = 0
    """SIGINTs received so far."""

    def request_stop(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
        self.requested = True

    def request_stop_now(self, reason: str) -> None:
        self.request_stop(reason)
        self.stop_now = True

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler."""
        name = signal.Signals(signum).name
        if signum != signal.SIGINT:
            log.warning("%s received: stopping after this step, with a checkpoint", name)
            self.request_stop(name)
            return
        self.interrupts += 1
        if self.interrupts == 1:
            log.warning("interrupted: stopping after this step, with a checkpoint (interrupt again to stop at once)")
            self.request_stop(name)
            return
        self.request_stop_now(name)
        raise Interrupted(
            "stopped at once by a second interrupt; nothing new was committed, the last checkpoint is intact"
        )


@contextmanager
def install_stop_handlers(flag: StopFlag | None = None) -> Iterator[StopFlag]:
    """Route SIGTERM and SIGINT to a StopFlag while the block runs; restore the previous handlers after."""
    flag = flag or StopFlag()
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: SIGTERM and Ctrl-C will not stop training gracefully")
        yield flag
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, flag.handle)
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
