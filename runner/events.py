"""The typed events every part emits, and the bus that delivers them.

Owns: the event vocabulary. The trainer and the session emit; the dashboard,
the TensorBoard writer and the sessions log subscribe. No module prints
directly. Imports nothing of Relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Base of all events."""


@dataclass(frozen=True)
class SessionStarted(Event):
    run: str
    platform: str
    gpu: str
    step: int
    target: int
    deadline_s: float | None  # seconds from now until the session must be over; None: no limit
    history: tuple[dict, ...] = ()  # earlier sessions, as in sessions.jsonl


@dataclass(frozen=True)
class Planned(Event):
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    reason: str = ""


@dataclass(frozen=True)
class ShapeReady(Event):
    """A batch shape's first micro-batch ran: its compile (and CUDA-graph capture) took `seconds`, a setup cost."""

    shape: str  # latent "CxHxW"
    seconds: float
    graphed: bool  # replayed as a CUDA graph from now on (else compiled-eager or eager)


@dataclass(frozen=True)
class CacheProgress(Event):
    done: int
    total: int
    what: str = "latents"


@dataclass(frozen=True)
class StepDone(Event):
    step: int
    target: int
    loss: float
    lr: float
    step_s: float  # wall seconds of this optimizer step
    grad_norm: float | None = None
    skipped: bool = False  # non-finite loss: the update was skipped
    vram_used_gib: float | None = None
    vram_peak_gib: float | None = None


@dataclass(frozen=True)
class Validated(Event):
    step: int
    val_loss: float


@dataclass(frozen=True)
class CheckpointStaged(Event):
    step: int
    bytes: int
    stage_s: float


@dataclass(frozen=True)
class UploadProgress(Event):
    step: int
    done_bytes: int
    total_bytes: int
    rate_bps: float


@dataclass(frozen=True)
class CheckpointCommitted(Event):
    step: int
    bytes: int
    upload_s: float


@dataclass(frozen=True)
class UploadFailed(Event):
    step: int
    error: str
    local_copy: str


@dataclass(frozen=True)
class SampleSaved(Event):
    step: int
    path: str


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - the event's name in the design
    message: str
    kind: str = "general"  # skipped-images, nan, retry, upload, lease, quota, …


@dataclass(frozen=True)
class SessionEnded(Event):
    step: int
    target: int
    reason: str  # completed, budget, signal, error
    exit_code: int


@dataclass
class EventBus:
    """Delivers each event to every subscriber, in order. A failing subscriber is logged, never fatal."""

    subscribers: list[Callable[[Event], None]] = field(default_factory=list)

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        self.subscribers.append(fn)

    def emit(self, event: Event) -> None:
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:  # a broken view must never stop training
                log.exception("event subscriber %r failed on %r", fn, event)
