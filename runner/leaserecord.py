"""The lease's record and the judgement of its holder's life: what lease.json says, read by anyone.

Owns: `LeaseRecord` (holder, token, since, heartbeat, the holder's own timeout), `read_lease`, and the
one judgement of whether a holder lives (`LeaseRecord.is_live`: a fresh heartbeat and, for a process of
this machine, that process still running; `holder_died_on`, `pid_is_running`). The lease (runner.lease),
`relay status` (runner.report) and the session's take-over all ask here.

Must not: write lease.json (runner.lease's protocol does), or import torch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.storage import Storage
from runner.storage.blobs import read_bytes

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_TIMEOUT_S = 300.0  # seconds; a heartbeat every third of it, so two missed beats still keep the lease


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # human-readable: "platform:host:pidN:session"
    token: str  # random per acquire; tells two sessions of one host apart
    since: str  # ISO time the holder acquired it
    heartbeat_wall: float  # Unix seconds of the last heartbeat
    timeout_s: float = DEFAULT_TIMEOUT_S  # the holder's own: a heartbeat older than this means it is dead

    def age_s(self, now_wall: float) -> float:
        return max(0.0, now_wall - self.heartbeat_wall)

    def is_fresh(self, now_wall: float) -> bool:
        """Whether the heartbeat is younger than the holder's timeout (its holder may be alive)."""
        return self.age_s(now_wall) < self.timeout_s

    def is_live(self, now_wall: float, host: str, is_running: Callable[[int], bool]) -> bool:
        """The one judgement of a holder's life (the lease, relay status, the session's take-over): a fresh
        heartbeat, and, when the holder is a process of `host`, that process still running."""
        return self.is_fresh(now_wall) and not holder_died_on(self.holder, host, is_running)

    @property
    def session_id(self) -> str:
        """The holder's session id (the last part of the holder string)."""
        return self.holder.rsplit(":", 1)[-1]


def read_lease(storage: Storage, run: str) -> LeaseRecord | None:
    """The current lease, or None if free (missing or unreadable: a torn lease protects nothing)."""
    return parse_lease(read_bytes(storage, f"{run}/{LEASE_FILE}"), f"{storage.url}/{run}/{LEASE_FILE}")


def parse_lease(raw: bytes | None, where: str) -> LeaseRecord | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return LeaseRecord(
            holder=str(data["holder"]),
            token=str(data["token"]),
            since=str(data["since"]),
            heartbeat_wall=float(data["heartbeat_wall"]),
            timeout_s=float(data.get("timeout_s", DEFAULT_TIMEOUT_S)),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; treating the run as free", where)
        return None


def holder_died_on(holder: str, host: str, is_running: Callable[[int], bool]) -> bool:
    """Whether `holder` ("platform:host:pidN:session") is a process of `host` that no longer runs.

    Such a lease (left by a crash or a kill on this machine) may be taken at once; one from another
    machine cannot be judged from here and must age past the timeout, or be taken with --take-over."""
    parts = holder.split(":")
    if len(parts) < 3 or parts[1] != host or not parts[2].startswith("pid"):
        return False
    pid = parts[2].removeprefix("pid")
    return pid.isdigit() and int(pid) > 0 and not is_running(int(pid))


def pid_is_running(pid: int) -> bool:
    """Whether process `pid` of this machine still runs. A zombie (killed, not yet reaped by its parent) answers
    kill(pid, 0) but runs no more: it is gone (proc(5): state "Z" in /proc/PID/stat)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # someone else's process, or not a pid: not provably gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (not Linux): kill(pid, 0) is all we know
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]  # the name in parentheses may hold spaces
