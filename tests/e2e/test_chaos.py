"""Exact resume under kills and signals: `relay train` killed at random moments ends with the same LoRA.

A run is started in a subprocess and SIGKILLed at seeded moments — pure delays, and moments
picked by watching the storage and staging folders (cache build, checkpoint staging, upload
before COMMIT.json, right after a commit while rotation runs, inside steps, final export) —
and restarted each time until it exits 0. Then its final LoRA must equal an uninterrupted
run's bit for bit; every restart must resume from exactly the newest verified checkpoint (so
no half-written checkpoint is chosen and no committed step is lost); and no COMMIT.json may
ever vouch for files that do not match it. SIGTERM / SIGINT must stop gracefully (exit 75,
a checkpoint at the current step), a double SIGINT at once with nothing half-committed.

Short forms run in CI; the long form (`-m chaos`) kills 30+ times.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    RUN,
    Reference,
    assert_same_lora,
    broken_commits,
    relay_env,
    send,
    sessions,
    start_relay,
    train_args,
    verified_steps,
    wait_for,
    wait_relay,
)

STARTED = re.compile(r"relay \| step (\d+)/(\d+)")
TRIGGER_TIMEOUT_S = 180.0
LONG_STEPS = 1500  # enough that 30+ kills land before the target is reached, even at 0.08 s a step
SIGNAL_STEPS = 24
# A tiny step takes ~15 ms on an idle machine: a whole run would end between two polls. A quarter of a second
# per step (added after the step, changing no weight) gives the kills and signals a run to land in.
SLOW_STEPS = relay_env({"RELAY_TEST_STEP_DELAY_S": "0.25"})
# The kill test needs periodic checkpoints inside each session: the first comes once the prior checkpoint
# cost allows it (2 s at the tiny profile's 50 % overhead: 4 s of training), the next after every step.
KILL_STEPS, KILL_STEP_ENV = 16, relay_env({"RELAY_TEST_STEP_DELAY_S": "1.0"})
LONG_STEP_ENV = relay_env({"RELAY_TEST_STEP_DELAY_S": "0.05"})  # the long run: 1,500 steps last over a minute


def started_step(log: Path, target: int) -> int | None:
    """The step a session resumed from: its first dashboard line that knows the target (SessionStarted)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for match in STARTED.finditer(text):
        if int(match.group(2)) == target:
            return int(match.group(1))
    return None


def newest(run_dir: Path) -> int:
    return max(verified_steps(run_dir), default=0)


@dataclass
class Chaos:
    """One chaos run: storage under `root`, sessions killed per the seeded plan until one exits 0."""

    root: Path
    steps: int
    rng: random.Random
    env: dict | None = None  # the sessions' environment (None: relay_env())
    phases: Counter = field(default_factory=Counter)
    kills: int = 0
    lost_steps: int = 0
    sessions_run: int = 0

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def run_dir(self) -> Path:
        return self.storage / RUN

    # --- when to kill ---------------------------------------------------------------------

    def _staging(self, workdir: Path) -> list[int]:
        folder = workdir / RUN / "staging"
        return [int(p.name.split("-")[1]) for p in folder.glob("step-*")] if folder.is_dir() else []

    def _uncommitted_upload(self, at_least: int) -> bool:
        return any(s >= at_least and not (f / "COMMIT.json").exists() for s, f in _folders(self.run_dir).items())

    def _committed_above(self, step: int) -> bool:
        return any(s > step and (f / "COMMIT.json").exists() for s, f in _folders(self.run_dir).items())

    def wait_trigger(self, trigger: str, proc, workdir: Path, log: Path, start: int) -> None:
        """Block until the moment `trigger` names (or the process ends, or a timeout)."""
        exited = lambda: proc.poll() is not None  # noqa: E731 - stop waiting once it exited
        if trigger == "delay":
            wait_for(exited, self.rng.uniform(0.5, 4.0), poll_s=0.05)  # a fast run is over in ~20 s
        elif trigger == "cache":
            wait_for(lambda: exited() or (workdir / RUN / "cache").is_dir(), TRIGGER_TIMEOUT_S)
            time.sleep(self.rng.uniform(0.0, 1.0))
        elif trigger == "staging":  # the second checkpoint of the session: the first one's step is kept
            wait_for(lambda: exited() or any(s >= start + 2 for s in self._staging(workdir)), TRIGGER_TIMEOUT_S)
            time.sleep(self.rng.uniform(0.0, 0.05))
        elif trigger == "upload":
            wait_for(lambda: exited() or self._uncommitted_upload(start + 2), TRIGGER_TIMEOUT_S, poll_s=0.001)
        elif trigger == "commit":  # right after a COMMIT.json landed: verification and rotation run now
            wait_for(lambda: exited() or self._committed_above(start), TRIGGER_TIMEOUT_S, poll_s=0.001)
            time.sleep(self.rng.uniform(0.0, 0.02))
        elif trigger == "step":
            wait_for(lambda: exited() or started_step(log, self.steps) is not None, TRIGGER_TIMEOUT_S, poll_s=0.05)
            time.sleep(self.rng.uniform(0.3, 3.0))
        elif trigger == "final":  # the target's checkpoint is committed; final/ is being exported
            wait_for(lambda: exited() or self._committed_above(self.steps - 1), TRIGGER_TIMEOUT_S, poll_s=0.01)
            time.sleep(self.rng.uniform(0.0, 2.0))

    def phase_now(self, workdir: Path, log: Path, trigger: str) -> str:
        """What the killed process was doing, judged from the folders at the moment of the kill."""
        if not (self.run_dir / "cache").is_dir() or not any((self.run_dir / "cache").glob("*/COMMIT.json")):
            return "cache build"
        if started_step(log, self.steps) is None:
            return "startup"
        if self.steps in verified_steps(self.run_dir):
            return "final export"
        if trigger == "commit":  # killed within 20 ms of a COMMIT.json landing: verify and rotate run then
            return "commit/rotation"
        top = newest(self.run_dir)
        if self._uncommitted_upload(top + 1):  # (folders below the newest may be leftovers of older kills)
            return "upload"
        if any(s > top for s in self._staging(workdir)):
            return "staging"
        return "step"

    # --- the run ----------------------------------------------------------------------------

    def run(self, triggers: list[str], *, max_sessions: int = 80) -> None:
        workdir = self.root / "work-1"
        for number in range(1, max_sessions + 1):
            if number > 1 and self.rng.random() < 0.5:
                workdir = self.root / f"work-{number}"  # a fresh VM: nothing local survives
            start = newest(self.run_dir)
            log = self.root / f"session-{number}.log"
            # A SIGKILLed session leaves its lease behind (fresh for 300 s): the next one takes it over.
            flags = ("--take-over",) if number > 1 else ()
            proc = start_relay(train_args(self.storage, workdir, steps=self.steps, flags=flags), log, env=self.env)
            self.sessions_run += 1
            if self.kills < len(triggers):
                self.wait_trigger(triggers[self.kills], proc, workdir, log, start)
            if self.kills < len(triggers) and proc.poll() is None:
                phase = self.phase_now(workdir, log, triggers[self.kills])
                send(proc, signal.SIGKILL)
                wait_relay(proc)
                self.kills += 1
                self.phases[phase] += 1
                self._check_session(log, start)
                continue
            code = wait_relay(proc, timeout_s=600)
            self._check_session(log, start)
            assert code == 0, f"session {number} exited {code}:\n{log.read_text()[-3000:]}"
            return
        raise AssertionError(f"no session reached the target in {max_sessions} sessions")

    def _check_session(self, log: Path, start: int) -> None:
        """The session resumed from exactly the newest verified checkpoint; no commit is broken."""
        resumed = started_step(log, self.steps)
        if resumed is not None:
            self.lost_steps += max(0, start - resumed)
            assert resumed == start, f"{log}: resumed from step {resumed}, but step {start} was committed and verified"
        assert broken_commits(self.run_dir) == [], "a COMMIT.json vouches for files that do not match it"


def _folders(run_dir: Path) -> dict[int, Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.glob("step-*"):
        try:
            found[int(p.name.split("-")[1])] = p
        except ValueError:
            continue
    return found


def _finish(chaos: Chaos, ref: Reference, reliability, test: str) -> None:
    assert_same_lora(chaos.run_dir / "final" / "pytorch_lora_weights.safetensors", ref.final_lora)
    assert_same_lora(chaos.run_dir / "checkpoints" / f"step-{ref.steps:08d}" / "lora.safetensors", ref.last_lora)
    assert chaos.lost_steps == 0
    reliability.record("SIGKILL at random moments", test=test, injected=chaos.kills, survived=True,
                       lost_steps=chaos.lost_steps, notes=dict(chaos.phases))  # fmt: skip


def test_sigkill_resume_is_exact_short(tmp_path, reference_factory, reliability):
    """CI form: a kill while staging, one before COMMIT.json, one right after a commit."""
    reference = reference_factory(KILL_STEPS)
    chaos = Chaos(tmp_path, reference.steps, random.Random(4), env=KILL_STEP_ENV)
    chaos.run(["staging", "upload", "commit"])
    assert chaos.kills == 3, f"only {chaos.kills} kills landed: the run ended first (phases {dict(chaos.phases)})"
    _finish(chaos, reference, reliability, "test_sigkill_resume_is_exact_short")


@pytest.mark.chaos
def test_sigkill_resume_is_exact_long(tmp_path, reference_factory, reliability):
    """30+ kills across one run, seeded: every phase from the cache build to the final export."""
    ref = reference_factory(LONG_STEPS)
    rng = random.Random(20261122)
    triggers = ["cache", "delay"] + [
        rng.choice(["delay", "staging", "upload", "commit", "step", "step"]) for _ in range(28)
    ] + ["final", "final"]  # fmt: skip
    chaos = Chaos(tmp_path, ref.steps, rng, env=LONG_STEP_ENV)
    chaos.run(triggers, max_sessions=120)
    assert chaos.kills >= 30, f"only {chaos.kills} kills landed before the run ended ({dict(chaos.phases)})"
    _finish(chaos, ref, reliability, "test_sigkill_resume_is_exact_long")


# ---------------------------------------------------------------- graceful signals


def _graceful(tmp_path: Path, number: int, workdir: Path, steps: int, sig: signal.Signals, *, twice: bool = False):
    """Start a session, let it commit a step, send `sig` (twice: again at once); its exit code and log."""
    storage = tmp_path / "storage"
    start = newest(storage / RUN)
    log = tmp_path / f"session-{number}.log"
    proc = start_relay(train_args(storage, workdir, steps=steps), log, env=SLOW_STEPS)
    # Training has begun (SessionStarted is printed at once); the budget may space checkpoints
    # widely, so a commit is no signal to wait for. Stop it a moment into its steps.
    assert wait_for(lambda: proc.poll() is not None or started_step(log, steps) is not None, 240, poll_s=0.02)
    time.sleep(0.3)
    send(proc, sig)
    if twice:  # after the first was handled: two signals inside one torch call would count as one
        wait_for(lambda: proc.poll() is not None or "interrupt again" in log.read_text(errors="replace"), 60)
        send(proc, sig)
    code = wait_relay(proc, timeout_s=240)
    resumed = started_step(log, steps)
    assert resumed == start, f"{log}: resumed from {resumed}, newest verified checkpoint was {start}"
    return code, log


def test_sigterm_and_sigint_stop_gracefully_and_resume_exactly(tmp_path, reference_factory, reliability):
    reference = reference_factory(SIGNAL_STEPS)  # room for three stopped sessions before the target
    storage, steps, workdir = tmp_path / "storage", reference.steps, tmp_path / "work"
    for number, sig in enumerate((signal.SIGTERM, signal.SIGINT), 1):
        code, log = _graceful(tmp_path, number, workdir, steps, sig)
        assert code == 75, f"{sig.name}: exit {code}, expected 75 (run again):\n{log.read_text()[-2000:]}"
        record = sessions(storage / RUN)[-1]
        assert record["reason"] == "signal"
        assert newest(storage / RUN) == record["step_to"], "no checkpoint at the step the session stopped at"
        assert "Traceback" not in log.read_text()
    before = newest(storage / RUN)
    code, log = _graceful(tmp_path, 3, workdir, steps, signal.SIGINT, twice=True)
    assert code == 75, f"double SIGINT: exit {code}, expected 75:\n{log.read_text()[-2000:]}"
    assert "stopped at once" in log.read_text(), "the second SIGINT did not stop the session at once"
    assert broken_commits(storage / RUN) == []
    assert newest(storage / RUN) >= before
    assert "Traceback" not in log.read_text()
    log = tmp_path / "session-4.log"
    start = newest(storage / RUN)
    proc = start_relay(train_args(storage, workdir, steps=steps), log)
    assert wait_relay(proc) == 0, log.read_text()[-3000:]
    assert started_step(log, steps) == start
    assert_same_lora(storage / RUN / "final" / "pytorch_lora_weights.safetensors", reference.final_lora)
    test = "test_sigterm_and_sigint_stop_gracefully_and_resume_exactly"
    reliability.record("SIGTERM (graceful stop)", test=test, injected=1, survived=True)
    reliability.record("SIGINT (graceful stop)", test=test, injected=1, survived=True)
    reliability.record("double SIGINT (stop at once)", test=test, injected=2, survived=True)
