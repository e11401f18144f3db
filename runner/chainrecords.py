"""The chain's records in the run's store (RUN/chain/): who pushes the next session, and what happened.

Owns: the successor claim that lets the store pick exactly one pusher among racing sessions
(`claim_successor`), the link a session continues (`begin_session`), the pushed and stop-flag records
(`relay stop --chain` writes RUN/chain/STOP), and `status()` for `relay status` and the dashboard. The
claim's rules are written out in docs/chain.md; keep the two in step.

Must not: decide whether to push or call the Kaggle API (runner/chain.py does), read secrets, or import torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.clock import Clock
from runner.state import read_bytes

log = logging.getLogger(__name__)

CHAIN_DIR = "chain"
STOP_FILE = "STOP"
PUSHED_FILE = "pushed.json"
SETTLE_S = 15.0  # claim window: longer than a claim's write + the store's listing lag (docs/chain.md)


# Why a chain ended (or did not push this time). "pushed" is the one that continues it.
PUSHED, COMPLETED, NEEDS_PERSON, STOP_FLAG, QUOTA, QUEUED, LOST_RACE, PUSH_FAILED, SESSION_CAP = (
    "pushed", "completed", "needs-person", "stop-flag", "quota", "queued", "lost-race", "push-failed", "session-cap",
)  # fmt: skip


def put_json(storage, key: str, data: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record.json"
        path.write_text(json.dumps(data, sort_keys=True))
        storage.put(path, key)


def get_json(storage, key: str) -> dict | None:
    raw = read_bytes(storage, key)
    try:
        return json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is not JSON; ignored", key)
        return None


def successor_dir(run: str, index: int) -> str:
    return f"{run}/{CHAIN_DIR}/successor-{index:04d}"


def pushed_successors(storage, run: str) -> list[dict]:
    """The pushed.json records, oldest first (each: index, version, pushed_wall, accelerator)."""
    keys = [k for k in storage.list(f"{run}/{CHAIN_DIR}") if k.endswith(f"/{PUSHED_FILE}")]
    records = [r for r in (get_json(storage, k) for k in keys) if r]
    return sorted(records, key=lambda r: r.get("index", 0))


def request_stop(storage, run: str, clock: Clock, by: str = "") -> None:
    """`relay stop --chain`: no session of this run pushes a successor from now on."""
    put_json(storage, f"{run}/{CHAIN_DIR}/{STOP_FILE}", {"requested_wall": clock.wall(), "by": by})


def clear_stop(storage, run: str) -> None:
    """Let the chain run again (`relay stop --chain --undo`)."""
    storage.delete(f"{run}/{CHAIN_DIR}/{STOP_FILE}")


def claim_successor(storage, run: str, index: int, clock: Clock, settle_s: float = SETTLE_S) -> str | None:
    """The key of this session's winning claim to push successor `index`; None if it lost. At most one wins.

    The store has no atomic create, so claims are files of unique names and the listing
    decides: look first (a claim already there: someone came earlier, lose), write a claim,
    wait `settle_s`, list again; the lowest claim id among those seen wins. Two racers that
    both found the folder empty both wrote before either listed again, so both see both and
    agree; a later racer sees the earlier claim at its first look. This holds while
    `settle_s` exceeds the time from a racer's first look to its claim being listed
    (docs/chain.md).
    """
    folder = successor_dir(run, index)
    if storage.list(folder):
        return None
    mine = f"claim-{uuid.uuid4().hex}.json"
    put_json(storage, f"{folder}/{mine}", {"claimed_wall": clock.wall()})
    clock.sleep(settle_s)
    claims = sorted(k.rsplit("/", 1)[-1] for k in storage.list(folder) if "/claim-" in k)
    won = bool(claims) and claims[0] == mine and not storage.exists(f"{folder}/{PUSHED_FILE}")
    return f"{folder}/{mine}" if won else None


def claimed_link(storage, run: str) -> int:
    """The highest successor index that has a claim or a push in the store (0: none yet)."""
    indexes = [0]
    for key in storage.list(f"{run}/{CHAIN_DIR}"):
        parts = key.split("/")
        if len(parts) >= 2 and parts[-2].startswith("successor-") and parts[-2][10:].isdigit():
            indexes.append(int(parts[-2][10:]))
    return max(indexes)


def begin_session(storage, run: str, state_file: Path, clock: Clock) -> int:
    """At a session's start: the chain link it continues, noted once per VM in `state_file` (0600).

    The link is the highest successor index claimed so far; at its end the session pushes
    link + 1, unless a successor above its link exists by then (pushed while it ran: that one
    is the next session). A restarted kernel on the same VM finds the file and keeps its link,
    so running the hook twice pushes nothing twice. Also recorded in RUN/chain/started/ for status.
    """
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["link"])
    link = claimed_link(storage, run)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"run": run, "link": link}))
    state_file.chmod(0o600)
    put_json(storage, f"{run}/{CHAIN_DIR}/started/{link:04d}-{uuid.uuid4().hex[:8]}.json",
              {"link": link, "started_wall": clock.wall()})  # fmt: skip
    return link


@dataclass(frozen=True)
class ChainStatus:
    """The chain as `relay status` and the dashboard show it."""

    pushed: int  # successors pushed so far
    sessions: int  # sessions the run has recorded
    next_queued: dict | None  # the newest pushed successor, while no session has started from it
    stopped: str | None  # why the chain ended (a reason), None while it runs or before it ran
    message: str = ""
    stop_requested: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def status_if_any(storage, run: str) -> dict | None:
    """The chain's status as a dict for `relay status`, or None for a run that never chained."""
    return status(storage, run).to_dict() if storage.list(f"{run}/{CHAIN_DIR}") else None


def status(storage, run: str) -> ChainStatus:
    from runner.state import read_sessions  # noqa: PLC0415

    pushed = pushed_successors(storage, run)
    sessions = read_sessions(storage, run)
    started = [int(k.rsplit("/", 1)[-1][:4]) for k in storage.list(f"{run}/{CHAIN_DIR}/started") if k[-1:] != "/"]
    queued = pushed[-1] if pushed and pushed[-1].get("index", 0) > max(started, default=0) else None
    decisions = sorted(
        (d for d in (get_json(storage, k) for k in storage.list(f"{run}/{CHAIN_DIR}/decisions")) if d),
        key=lambda d: d.get("at_wall", 0),
    )
    last = decisions[-1] if decisions else None
    ended = last is not None and last.get("action") == "stop" and last.get("reason") not in (QUEUED, LOST_RACE)
    return ChainStatus(
        len(pushed), len(sessions), queued, last["reason"] if ended else None, last.get("message", "") if last else "",
        storage.exists(f"{run}/{CHAIN_DIR}/{STOP_FILE}"),
    )  # fmt: skip
