"""The local folder of one detached run: where the supervisor, the trainer and every view meet.

    $RELAY_HOME/runs/RUN-STORAGEHASH/   (RELAY_HOME defaults to ~/.relay)
        events.jsonl     every trainer event, one JSON line each (runner.events.EventLog)
        state.json       the supervisor's pids, phase, restarts and final exit code
        trainer.log      the trainer's own output (plain progress lines, errors)
        supervisor.log   the supervisor's output (only when something is very wrong)

Owns: `RunDir` (its files, the supervisor's state, whether a supervisor or trainer of the run still runs
on this machine, the newest committed step its events log knows of) and `run_dir_for` (one folder per run
and storage).

Must not: start, stop or supervise anything (runner.daemon does), or import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner import events as ev
from runner.errors import EXIT_OK
from runner.leaserecord import pid_is_running

ENV_HOME = "RELAY_HOME"
PHASE_STARTING, PHASE_RUNNING, PHASE_RESTARTING, PHASE_ENDED = "starting", "running", "restarting", "ended"


@dataclass(frozen=True)
class RunDir:
    """The local folder of one detached run (see the module docstring)."""

    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def trainer_log(self) -> Path:
        return self.root / "trainer.log"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def write_state(self, **changes) -> dict:
        state = {**self.read_state(), **changes}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)
        return state

    def is_live(self) -> bool:
        """A supervisor or trainer of this run is still running on this machine."""
        state = self.read_state()
        if not state or state.get("phase") == PHASE_ENDED:
            return False
        return any(pid_alive(state.get(k)) for k in ("supervisor_pid", "trainer_pid"))

    def is_finished(self) -> bool:
        state = self.read_state()
        return state.get("phase") == PHASE_ENDED and state.get("exit_code") == EXIT_OK

    def committed_step(self) -> int:
        """The newest committed step the events log knows of (a resumed session starts at one)."""
        records, _ = ev.read_records(self.events)
        step = 0
        for event in ev.iter_events(records):
            if isinstance(event, (ev.CheckpointCommitted, ev.SessionStarted)):
                step = max(step, event.step)
        return step


def pid_alive(pid) -> bool:
    """Whether `pid` (as state.json holds it: an int, or missing) is a process of this machine that still runs."""
    return isinstance(pid, int) and pid > 0 and pid_is_running(pid)


def runs_home(env: Mapping[str, str]) -> Path:
    return Path(env.get(ENV_HOME) or Path(env.get("HOME") or Path.home()) / ".relay") / "runs"


def run_dir_for(run: str, storage: str, env: Mapping[str, str]) -> RunDir:
    """The local folder of the run `run` in `storage`: the same run in two storages gets two folders."""
    digest = hashlib.sha1(storage.strip().rstrip("/").encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run)
    return RunDir(runs_home(env) / f"{safe}-{digest}")
