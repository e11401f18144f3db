"""`relay profiles` and `relay status`: read-only reports (`relay doctor` is runner.doctor's).

Owns: what these commands print. Loads no model and needs no GPU: status reads
run.json, sessions.jsonl, lease.json, which checkpoint folders hold a
COMMIT.json (names only, nothing is verified) and the newest one's small
state.json (for sessions killed before they could log themselves). A session is live while it holds the lease
with a heartbeat younger than the lease's timeout (and, on this machine, its process
runs); earlier sessions a checkpoint still records as "running" ended without a
record: killed. Reading never creates anything: a missing folder is an error. Imports no torch.
Stored values are printed as plain text, never as rich markup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from runner import humanize
from runner.checkpoint.layout import CHECKPOINT_DIR, STATE_FILE, committed_steps, step_dir_name
from runner.checkpoint.manifest import COMMIT
from runner.clock import iso
from runner.errors import UsageError
from runner.experiment import ExperimentRecord, list_experiments, read_record
from runner.leaserecord import pid_is_running, read_lease
from runner.profile import list_profiles
from runner.state import find_run, read_run_info, read_sessions
from runner.storage.blobs import read_bytes
from runner.storage.url import open_storage

log = logging.getLogger(__name__)
CLEAN_ENDS = ("completed", "budget", "signal")  # how a session that exits on its own ends
SESSION_LENGTHS_H = (3.0, 12.0)  # a typical Colab free session (often less than its 12 h cap), a Kaggle one


def print_profiles(console: Console | None = None) -> int:
    console = console or Console()
    table = Table("profile", "description", box=None, pad_edge=False)
    for name, desc in list_profiles():
        table.add_row(name, desc)
    console.print(table)
    console.print("use: relay train --profile NAME   (or a path to your own .toml)")
    return 0


@dataclass(frozen=True)
class RunStatus:
    """A run's progress as its storage records it."""

    run: str
    step: int  # the newest committed checkpoint's step (0 before the first)
    target: int  # optimizer steps the run aims for
    last_checkpoint: int | None  # None before the first checkpoint
    sessions: list[dict]  # sessions.jsonl records, oldest first
    steps_per_hour: float | None  # measured over all sessions' training time; None before any
    complete: bool = False  # final/ is committed
    holder: str | None = None  # who holds the lease (a session training now, or one that died)
    heartbeat: str | None = None  # ISO time of the holder's last heartbeat
    heartbeat_age_s: float | None = None  # seconds since that heartbeat, when status was read
    holder_alive: bool = False  # the holder's heartbeat is younger than the lease timeout (and its process runs)
    chain: dict | None = None  # the hands-off Kaggle chain (runner.chain.ChainStatus), when the run has one

    @property
    def hours_left(self) -> float | None:
        if self.complete or self.step >= self.target:
            return 0.0
        if not self.steps_per_hour:
            return None
        return (self.target - self.step) / self.steps_per_hour

    def sessions_left(self, session_h: float) -> int | None:
        hours = self.hours_left
        return None if hours is None else humanize.sessions_for(hours, session_h)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self), "hours_left": self.hours_left,
            "sessions_left": {f"{h:g}h": self.sessions_left(h) for h in SESSION_LENGTHS_H},
        }  # fmt: skip


def read_status(storage, run: str | None, *, now_wall: float | None = None, host: str | None = None,
                pid_alive=None) -> RunStatus:  # fmt: skip
    """What `relay status` shows, from run.json, sessions.jsonl, the COMMIT.json names and lease.json.

    now_wall / host / pid_alive: the wall clock, this machine's name and a check that a process id runs
    (None: the real ones; tests pass their own)."""
    run = find_run(storage, run)
    info = read_run_info(storage, run, missing_ok=True)
    record = read_record(storage, run) if info is None else None
    if record is not None and record.variants:  # an experiment: its variants' progress as one (the chain reads it)
        return _experiment_as_one(run, experiment_status(storage, record, now_wall=now_wall, host=host,
                                                         pid_alive=pid_alive))  # fmt: skip
    if info is None:
        raise UsageError(f"{storage.url}: no run named {run!r} (no {run}/run.json)",
                         hint="check --run and --storage; `relay status --storage URL` lists the runs there")  # fmt: skip
    committed = committed_steps(storage, run)
    last = committed[-1] if committed else None
    lease = read_lease(storage, run)
    now_wall = time.time() if now_wall is None else now_wall  # the CLI edge: status is read once, now
    age = lease.age_s(now_wall) if lease else None
    alive = lease is not None and lease.is_live(now_wall, host or socket.gethostname(), pid_alive or pid_is_running)
    live_id = lease.session_id if alive else None
    sessions = settle_sessions(_checkpoint_sessions(storage, run, last), read_sessions(storage, run), live_id=live_id)
    trained_steps = sum(s.get("steps", 0) for s in sessions)
    train_hours = sum(s.get("train_s", 0.0) for s in sessions) / 3600
    rate = trained_steps / train_hours if train_hours > 0 and trained_steps > 0 else None
    return RunStatus(
        run, last or 0, info.target, last, sessions, rate, complete=storage.exists(f"{run}/final/{COMMIT}"),
        holder=lease.holder if lease else None, heartbeat=iso(lease.heartbeat_wall) if lease else None,
        heartbeat_age_s=age, holder_alive=alive,
    )  # fmt: skip


def _checkpoint_sessions(storage, run: str, step: int | None) -> list[dict]:
    """The session records inside the newest checkpoint's state.json ([] when there is none or it is unreadable)."""
    if step is None:
        return []
    raw = read_bytes(storage, f"{run}/{CHECKPOINT_DIR}/{step_dir_name(step)}/{STATE_FILE}")
    try:
        sessions = json.loads(raw or b"{}").get("sessions", [])
    except (ValueError, AttributeError):
        log.warning("%s: state.json of step %d is unreadable; sessions come from sessions.jsonl only", run, step)
        return []
    return [s for s in sessions if isinstance(s, dict)]


def settle_sessions(in_checkpoint: list[dict], logged: list[dict], *, live_id: str | None = None) -> list[dict]:
    """Every session of a run with how it really ended, in start order. Pure.

    A checkpoint records its session while it trains ("running"); sessions.jsonl gets a line when a session
    exits, with its last step and end. A logged line wins over the checkpoint's copy. A session only in
    the checkpoints ended without a record (killed outright: a Colab disconnect, SIGKILL) unless it is
    `live_id`, the session holding a live lease, which is still running."""
    known = {s.get("id") for s in logged}
    unlogged = []
    for s in in_checkpoint:
        if s.get("id") in known:
            continue
        if s.get("id") is not None and s.get("id") == live_id:
            unlogged.append({**s, "reason": "running"})
        else:
            unlogged.append({**s, "reason": s.get("reason") if s.get("reason") in CLEAN_ENDS else "killed"})
    if not unlogged:
        return logged
    return sorted([*logged, *unlogged], key=lambda s: s.get("start_wall") or 0)


def session_history(storage, run: str, in_checkpoint: list[dict]) -> list[dict]:
    """The sessions before this one, settled against sessions.jsonl: what a new session shows and records
    (in the dashboard's history, later checkpoints and the model card) instead of the checkpoint's
    "running" copies."""
    return settle_sessions(in_checkpoint, read_sessions(storage, run))


def print_status(storage_url: str, run: str | None, *, as_json: bool = False, console: Console | None = None,
                 chain_of=None) -> int:  # fmt: skip
    """`relay status`. chain_of(storage, run): the run's Kaggle chain as a dict, or None (runner.chain)."""
    console = console or Console()
    missing = _missing_local_folder(storage_url)
    if missing is not None:  # opening a local storage creates its folder; a status must not
        raise UsageError(f"--storage {storage_url}: no such folder ({missing})",
                         hint="check the path; runs are in the folder given to relay train --storage")  # fmt: skip
    storage = open_storage(storage_url)
    experiment = experiment_of(storage, run)
    if experiment is not None:
        return print_experiment_status(storage, experiment, as_json=as_json, console=console)
    status = read_status(storage, run)
    if chain_of is not None:
        status = dataclasses.replace(status, chain=chain_of(storage, status.run))
    if as_json:
        console.print_json(json.dumps(status.to_dict()))
        return 0
    # Stored values (run names, hosts like "colab:abc:pid7") go out as plain Text: as markup, ":abc:" would
    # become an emoji and "[x]" a style.
    pct = 100 * status.step / status.target if status.target else 0
    done = " — complete, final/ written" if status.complete else ""
    console.print(Text.assemble((status.run, "bold"), f": step {status.step} / {status.target} ({pct:.0f} %){done}"))
    last = status.last_checkpoint
    console.print(Text(f"last committed checkpoint: {'step ' + str(last) if last is not None else 'none yet'}"))
    if status.holder and not status.complete:
        ago = humanize.duration(status.heartbeat_age_s or 0)
        state = "training now" if status.holder_alive else "that session is gone; the next relay train takes over"
        console.print(Text(f"lease held by {status.holder} (last heartbeat {ago} ago, {status.heartbeat}): {state}"))
    console.print(Text(_still_needed(status)))
    if status.chain:
        console.print(Text(_chain_line(status.chain)))
    _print_sessions(console, status.sessions)
    return 0


def experiment_of(storage, run: str | None) -> ExperimentRecord | None:
    """The experiment `run` names, or with no run the store's only experiment when every run there is one
    of its variants; None for a plain run."""
    if run:
        return read_record(storage, run) if read_run_info(storage, run, missing_ok=True) is None else None
    names = list_experiments(storage)
    if len(names) != 1:
        return None
    record = read_record(storage, names[0])
    runs = {key.split("/")[0] for key in storage.list("") if key.endswith("/run.json")}
    return record if record is not None and runs <= set(record.runs()) else None


def experiment_status(storage, record: ExperimentRecord, **kw) -> list[tuple[str, RunStatus | None, str]]:
    """(variant, its status or None when not started, its failure or "") in declared order."""
    out = []
    for name, run in record.variants:
        status = read_status(storage, run, **kw) if read_run_info(storage, run, missing_ok=True) else None
        out.append((name, status, record.failed.get(name, "")))
    return out


def _experiment_as_one(name: str, rows: list[tuple[str, RunStatus | None, str]]) -> RunStatus:
    """An experiment as one run: steps and targets summed over the variants, every variant's sessions,
    complete when each variant is; the live holder if one trains now. A variant not started yet counts
    0 / its target only once it has a run.json, so `complete` needs every variant started and complete."""
    started = [status for _, status, _ in rows if status is not None]
    sessions = sorted((s for st in started for s in st.sessions), key=lambda s: s.get("start_wall", 0.0))
    steps = sum(s.get("steps", 0) for s in sessions)
    hours = sum(s.get("train_s", 0.0) for s in sessions) / 3600
    live = next((st for st in started if st.holder_alive), None)
    complete = len(started) == len(rows) and all(st.complete for st in started)
    return RunStatus(
        name, sum(st.step for st in started), sum(st.target for st in started) + (len(rows) - len(started)),
        max((st.last_checkpoint for st in started if st.last_checkpoint is not None), default=None), sessions,
        steps / hours if hours > 0 and steps > 0 else None, complete=complete,
        holder=live.holder if live else None, heartbeat=live.heartbeat if live else None,
        heartbeat_age_s=live.heartbeat_age_s if live else None, holder_alive=live is not None,
    )  # fmt: skip


def print_experiment_status(storage, record: ExperimentRecord, *, as_json: bool = False,
                            console: Console | None = None) -> int:  # fmt: skip
    """`relay status` of an experiment: each variant's step / target, and which one trains now."""
    console = console or Console()
    rows = experiment_status(storage, record)
    if as_json:
        variants = [{"variant": name, "run": run, "failed": failed, "status": status.to_dict() if status else None}
                    for (name, status, failed), (_, run) in zip(rows, record.variants, strict=True)]  # fmt: skip
        complete = all(status is not None and status.complete for _, status, _ in rows)
        console.print_json(json.dumps({"experiment": record.name, "complete": complete, "variants": variants}))
        return 0
    done = sum(1 for _, status, _ in rows if status is not None and status.complete)
    console.print(Text.assemble((record.name, "bold"), f": experiment, {done} of {len(rows)} variants complete"))
    for name, status, failed in rows:
        if status is None:
            line = "not started" + (f" — failed: {failed.splitlines()[0]}" if failed else "")
        else:
            line = f"step {status.step} / {status.target}"
            if status.complete:
                line += " — complete, final/ written"
            elif status.holder and status.holder_alive:
                line += " — training now"
            if failed and not status.complete:
                line += f" — failed: {failed.splitlines()[0]}"
        console.print(Text(f"  {name}: {line}"))
    if done == len(rows):
        console.print(Text(f"compare them: relay compare --storage {storage.url} --experiment {record.name}"))
    return 0


def _chain_line(chain: dict) -> str:
    """The Kaggle chain in a sentence: sessions so far, the next one queued, or why it stopped."""
    line = f"Kaggle chain: {chain['pushed']} session(s) pushed"
    if chain.get("next_queued"):
        line += f"; the next one is queued (version {chain['next_queued'].get('version', '?')})"
    if chain.get("stopped"):
        line += f"; stopped: {chain['stopped']}" + (f" ({chain['message']})" if chain.get("message") else "")
    elif chain.get("stop_requested"):
        line += "; relay stop --chain asked it to stop after the session now running"
    return line


def _still_needed(status: RunStatus) -> str:
    if status.complete:
        return "nothing left to train: the LoRA is in final/"
    if status.hours_left is None:
        return "still needed: unknown until a session has trained some steps"
    sessions = humanize.sessions_needed({h: status.sessions_left(h) for h in SESSION_LENGTHS_H})
    return (
        f"still needed: {humanize.hours(status.hours_left)} of training at {status.steps_per_hour:.0f} steps/h, "
        f"{sessions}"
    )


def _missing_local_folder(url: str) -> Path | None:
    """The folder a local --storage names when it does not exist; None for one that does, or a remote URL."""
    text = (url or "").strip()
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif text == "drive" or "://" in text or not text:
        return None
    path = Path(text).expanduser()
    return None if path.is_dir() else path


def _print_sessions(console: Console, sessions: list[dict]) -> None:
    if not sessions:
        console.print("no sessions recorded yet")
        return
    table = Table("#", "platform", "GPU", "started", "steps", "time", "ended", box=None)
    for i, s in enumerate(sessions, 1):
        cells = (
            i, s.get("platform", "?"), s.get("gpu", "?"), s.get("started", "?"),
            f"{s.get('step_from', '?')}→{s.get('step_to', '?')}", humanize.duration(s.get("wall_s") or 0),
            s.get("reason", "?"),
        )  # fmt: skip
        table.add_row(*(Text(str(cell)) for cell in cells))
    console.print(table)
