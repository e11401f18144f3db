"""The typed events every part emits, and the bus that delivers them.

Owns: the event vocabulary. The trainer and the session emit; the dashboard,
the TensorBoard writer and the sessions log subscribe. No module prints
directly. Imports nothing of Relay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
class BudgetUpdated(Event):
    """The session's budget as of now (the session emits it every few seconds while training), so every
    view that renders from events (the terminal, `relay attach`, the notebook cell) counts down the same."""

    time_left_s: float | None  # seconds until the session must have stopped; None: no deadline
    next_checkpoint_in_s: float | None  # seconds until the next periodic checkpoint is due; None: none planned


@dataclass(frozen=True)
class Notice(Event):
    """Something to know that is not a problem (a run found already complete); shown, never as a warning."""

    message: str


@dataclass(frozen=True)
class SessionEnded(Event):
    step: int
    target: int
    reason: str  # completed, budget, signal, error
    exit_code: int


@dataclass(frozen=True)
class TrainerRestarted(Event):
    """The supervisor of a detached run restarts the trainer after an unexpected failure."""

    attempt: int  # 1 for the first restart
    exit_code: int  # the failed trainer's exit code; negative: killed by that signal
    committed_step: int  # the run resumes from this committed step
    delay_s: float
    reason: str


@dataclass(frozen=True)
class TrainerExited(Event):
    """The supervisor of a detached run is done: the trainer's last exit code, and why it stopped there."""

    exit_code: int
    restarts: int
    message: str


ENV_EVENTS_LOG = "RELAY_EVENTS_LOG"
"""Set by the supervisor of a detached run (runner.daemon): the trainer appends every event, as one JSON
line, to the file it names. The environment is the one channel that reaches `python -m runner train`."""


def to_record(event: Event) -> dict:
    """The event as a JSON-able dict: its type name and its fields."""
    return {"type": type(event).__name__, **dataclasses.asdict(event)}


def from_record(record: Mapping) -> Event | None:
    """The event a record describes, or None for an unknown type (a log written by a newer Relay)."""
    cls = _TYPES.get(str(record.get("type")))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names}
    try:
        return cls(**values)
    except TypeError:  # a field missing: written by an older or newer Relay
        return None


def read_records(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines of `path` from byte `offset`, and the offset after the last complete line.

    A line still being written (no newline yet) is left for the next read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("unreadable line in %s skipped", path)
    return records, offset + end


def iter_events(records: list[dict]) -> Iterator[Event]:
    for record in records:
        event = from_record(record)
        if event is not None:
            yield event


@dataclass
class EventLog:
    """A subscriber that appends each event to a JSON-lines file (one write per line, flushed)."""

    path: Path

    def __call__(self, event: Event) -> None:
        line = json.dumps(to_record(event), default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def default_subscribers(env: Mapping[str, str]) -> list[Callable[[Event], None]]:
    """The subscribers every bus starts with: the events log of a detached run, if one is named.

    Only the leading rank writes it; the other ranks of a several-GPU session train in lockstep."""
    path = env.get(ENV_EVENTS_LOG, "")
    return [EventLog(Path(path))] if path and env.get("RANK", "0") == "0" else []


def _bus_subscribers() -> list[Callable[[Event], None]]:
    import os  # the edge: a detached trainer learns where its events go from its environment

    return default_subscribers(os.environ)


@dataclass
class EventBus:
    """Delivers each event to every subscriber, in order. A failing subscriber is logged, never fatal."""

    subscribers: list[Callable[[Event], None]] = field(default_factory=_bus_subscribers)

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        self.subscribers.append(fn)

    def emit(self, event: Event) -> None:
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:  # a broken view must never stop training
                log.exception("event subscriber %r failed on %r", fn, event)


_TYPES: dict[str, type[Event]] = {cls.__name__: cls for cls in Event.__subclasses__()}
