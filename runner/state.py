"""Run state that survives restarts, and the run's ledger files.

Owns: `RunState` (versioned JSON, stored in each checkpoint's COMMIT.json and
as state.json), `RunInfo` (RUN/run.json) and sessions.jsonl.

Must not: import torch or anything above the storage protocol; hold tensors
(those live in safetensors files listed by the manifest). Randomness is a
function of (seed, step, rank), so there is no RNG state here on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from runner.errors import CheckpointCorrupt, RelayError, StorageError, UsageError
from runner.storage import Storage
from runner.storage.blobs import read_bytes, write_bytes

log = logging.getLogger(__name__)

STATE_VERSION = 1
RUN_INFO_VERSION = 1
RUN_FILE = "run.json"
SESSIONS_FILE = "sessions.jsonl"


@dataclass(frozen=True)
class RunState:
    """Everything besides tensors that an exact resume needs."""

    run: str  # the run's name (its folder in storage)
    step: int  # optimizer steps done
    target: int  # optimizer steps the whole run aims for
    profile_fingerprint: str  # fingerprint(profile) of the settings that change results
    profile_fields: dict = field(default_factory=dict)  # those settings, so a mismatch can name what differs
    cache_fingerprint: str = ""  # which latent/embedding cache the run trains on
    plan: dict = field(default_factory=dict)  # the fit: micro_batch, grad_accum, gradient_checkpointing, world_size
    trainer: dict = field(default_factory=dict)  # JSON meta from the trainer's save_state (scheduler, scaler, …)
    sessions: list[dict] = field(default_factory=list)  # one record per session so far
    created: str = ""  # ISO time the run started
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "run state") -> RunState:
        """Parse; CheckpointCorrupt if malformed, RelayError if written by a newer Relay."""
        if not isinstance(data, dict):
            raise CheckpointCorrupt(f"{source}: run state is not a JSON object", path=source)
        _check_version(data.get("version"), STATE_VERSION, source)
        return cls(**_known_fields(cls, data, source))

    @classmethod
    def from_json(cls, text: str, *, source: str = "run state") -> RunState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointCorrupt(f"{source}: run state is not valid JSON ({exc})", path=source) from exc
        return cls.from_dict(data, source=source)


def _known_fields(cls: type, data: dict, source: str) -> dict:
    """The keys of `data` that are fields of `cls`; CheckpointCorrupt naming any required one missing."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise CheckpointCorrupt(f"{source}: lacks {', '.join(missing)}", path=source)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        log.debug("%s: ignoring unknown keys %s (written by a later Relay of the same format)", source, unknown)
    return {k: v for k, v in data.items() if k in names}


def _check_version(version: object, supported: int, source: str) -> None:
    if not isinstance(version, int) or version < 1:
        raise CheckpointCorrupt(f"{source}: version {version!r} is not valid", path=source)
    if version > supported:
        raise RelayError(
            f"{source}: written by a newer Relay (format version {version}; this one reads up to {supported})",
            hint="upgrade Relay (pip install -U …) in this notebook and run again",
        )


@dataclass(frozen=True)
class RunInfo:
    """RUN/run.json: what the run is, written once when it starts. Holds no secrets."""

    run: str
    profile: dict  # the profile snapshot (as loaded, overrides applied)
    fingerprint: str  # fingerprint(profile)
    target: int  # optimizer steps the run aims for when it started
    created: str  # ISO time
    fingerprint_fields: dict = field(default_factory=dict)  # the settings behind the fingerprint, by name
    version: int = RUN_INFO_VERSION


def write_run_info(storage: Storage, info: RunInfo) -> None:
    write_bytes(storage, f"{info.run}/{RUN_FILE}", json.dumps(dataclasses.asdict(info), indent=2).encode())


def read_run_info(storage: Storage, run: str, *, missing_ok: bool = True) -> RunInfo | None:
    """RUN/run.json; None for a run that was never started (StorageError instead when not missing_ok)."""
    key = f"{run}/{RUN_FILE}"
    raw = read_bytes(storage, key)
    if raw is None:
        if missing_ok:
            return None
        raise StorageError(
            f"{storage.url}: no run named {run!r} (no {key})",
            key=key,
            hint="check --run and --storage; `relay status --storage URL` lists the runs there",
        )
    where = f"{storage.url}/{key}"
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{where}: not valid JSON ({exc})", path=where) from exc
    if not isinstance(data, dict):
        raise CheckpointCorrupt(f"{where}: not a JSON object", path=where)
    _check_version(data.get("version"), RUN_INFO_VERSION, where)
    return RunInfo(**_known_fields(RunInfo, data, where))


def read_sessions(storage: Storage, run: str) -> list[dict]:
    """The records in RUN/sessions.jsonl, oldest first; unreadable lines are skipped with a warning."""
    raw = read_bytes(storage, f"{run}/{SESSIONS_FILE}")
    records = []
    for number, line in enumerate((raw or b"").decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s/%s line %d is not JSON; skipped", run, SESSIONS_FILE, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_session(storage: Storage, run: str, record: dict) -> None:
    """Add one line to RUN/sessions.jsonl.

    Storage objects are never modified in place (Drive has no append, and a Colab
    mount syncs whole files late), so this reads the file, adds the line and puts
    the whole file again; put replaces the key as a whole. Only the lease holder
    writes it, so read-modify-write does not race.
    """
    key = f"{run}/{SESSIONS_FILE}"
    old = read_bytes(storage, key) or b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes(storage, key, old + json.dumps(record, sort_keys=True).encode() + b"\n")


def find_run(storage, run: str | None) -> str:
    """`run`, or the only run in `storage` (a UsageError, exit 2, names the runs when there are several)."""
    if run:
        return run
    runs = sorted({key.split("/")[0] for key in storage.list("") if key.endswith("/run.json")})
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UsageError(
            f"no run found in {storage.url}", hint="start one with: relay train --profile NAME --storage URL"
        )
    raise UsageError(f"several runs in {storage.url}: {', '.join(runs)}", hint="choose one with --run NAME")
