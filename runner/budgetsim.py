"""`simulate_session`: the session budget's decisions replayed over one session on a fake clock, with given
true costs, for `relay plan`'s estimate and the budget's property tests.

Owns: the simulated loop only; every decision in it is `budget.next_action`, the function the session calls.
Must not: act, sleep or read the real clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from runner.budget import Action, BudgetContext, estimate_upload_left_s, next_action, training_fraction
from runner.clock import Clock, FakeClock
from runner.costs import CostMeter

Cost = float | Callable[[int], float]
"""A fixed number of seconds, or a function of the step / checkpoint index (for noise)."""


def _cost(cost: Cost, index: int) -> float:
    return float(cost(index)) if callable(cost) else float(cost)


@dataclass
class SimResult:
    """What a simulated session did. Times in seconds from the session's start."""

    deadline_s: float | None
    steps: int = 0
    checkpoints: int = 0  # periodic checkpoints committed (the final one not counted)
    training_s: float = 0.0
    checkpoint_s: float = 0.0  # staging time of the periodic checkpoints
    final_committed_s: float | None = None  # when the session's last checkpoint is committed; None: none taken
    end_s: float = 0.0  # when the session is done (final commit, or the last upload)
    work_at_risk_s: list[float] = field(default_factory=list)  # at each commit, just before it

    @property
    def max_work_at_risk_s(self) -> float:
        return max(self.work_at_risk_s, default=0.0)

    @property
    def training_fraction(self) -> float:
        """Training time over the whole session (its limit, else its end)."""
        return training_fraction(self.training_s, self.deadline_s or self.end_s)


@dataclass
class _Upload:
    captured: float
    started: float
    end: float


class _SessionSim:
    """The session's loop on a FakeClock: `next_action` decides (the same function the session calls);
    steps, staging and background uploads take the given costs."""

    def __init__(self, clock: Clock, meter: CostMeter, settings: dict[str, float], steps_left: int) -> None:
        self.clock, self.meter, self.settings = clock, meter, settings
        self.start = clock.monotonic()
        self.steps_left = steps_left
        self.uploads: list[_Upload] = []  # FIFO, one at a time
        self.last_capture = self.committed_capture = self.start
        self.taken = 0  # checkpoints captured, the index of the next one's costs
        self.result = SimResult(deadline_s=settings["hours"] * 3600.0 or None)

    def context(self) -> BudgetContext:
        now = self.clock.monotonic()
        left = 0.0
        if self.uploads:
            first = self.uploads[0]
            elapsed = max(0.0, now - first.started)
            left = estimate_upload_left_s(elapsed, self.meter.upload_s) + self.meter.upload_s * (len(self.uploads) - 1)
        deadline = None if self.result.deadline_s is None else self.start + self.result.deadline_s
        return BudgetContext(
            now=now,
            deadline=deadline,
            step_s=self.meter.step_s,
            checkpoint_cost_s=self.meter.checkpoint_s,
            upload_s=self.meter.upload_s,
            last_checkpoint_at=self.last_capture,
            every_min=self.settings["every_min"],
            max_overhead_pct=self.settings["max_overhead_pct"],
            margin_s=self.settings["margin_s"],
            steps_left=self.steps_left,
            training_s=self.result.training_s,
            checkpoint_s=self.result.checkpoint_s,
            upload_left_s=left,
        )

    def settle(self, until: float) -> None:
        """Commit every upload that has ended by `until`."""
        while self.uploads and self.uploads[0].end <= until:
            done = self.uploads.pop(0)
            self.result.work_at_risk_s.append(done.end - self.committed_capture)
            self.committed_capture = done.captured
            self.meter.add_upload(done.end - done.started)

    def step(self, step_cost: Cost) -> None:
        seconds = _cost(step_cost, self.result.steps)
        self.clock.sleep(seconds)
        self.meter.add_step(seconds)
        self.result.training_s += seconds
        self.result.steps += 1
        self.steps_left -= 1

    def checkpoint(self, stage_cost: Cost, upload_cost: Cost) -> float:
        """Capture and stage now (blocking), queue the upload; returns when it will be committed."""
        index, self.taken = self.taken, self.taken + 1
        self.last_capture = captured = self.clock.monotonic()
        stage = _cost(stage_cost, index)
        self.clock.sleep(stage)
        self.meter.add_checkpoint(stage)
        now = self.clock.monotonic()
        started = max([now, *(u.end for u in self.uploads)])
        self.uploads.append(_Upload(captured, started, started + _cost(upload_cost, index)))
        return self.uploads[-1].end


def simulate_session(
    *,
    hours: float,
    steps_left: int,
    step_s: Cost,
    checkpoint_s: Cost,
    upload_s: Cost,
    every_min: float = 10.0,
    max_overhead_pct: float = 2.0,
    margin_s: float = 180.0,
    meter: CostMeter | None = None,
    clock: Clock | None = None,
) -> SimResult:
    """Run the budget decisions over one session with the given true costs; 0 hours: no limit.

    `meter` carries the priors (default: the built-in ones); `clock` defaults to a FakeClock.
    """
    clock = clock or FakeClock()
    meter = meter or CostMeter()
    settings = {"hours": hours, "every_min": every_min, "max_overhead_pct": max_overhead_pct, "margin_s": margin_s}
    sim = _SessionSim(clock, meter, settings, steps_left)
    last_step_at_capture = 0
    while (action := next_action(sim.context(), has_new_steps=sim.result.steps > last_step_at_capture)) != Action.STOP:
        if action is Action.CHECKPOINT:
            sim.checkpoint(checkpoint_s, upload_s)
            last_step_at_capture = sim.result.steps
            sim.result.checkpoint_s += clock.monotonic() - sim.last_capture
            sim.result.checkpoints += 1
            continue
        sim.step(step_s)
        sim.settle(clock.monotonic())
    result = sim.result
    if result.steps > last_step_at_capture:  # else the last periodic checkpoint already holds every step
        sim.checkpoint(checkpoint_s, upload_s)
    end = sim.uploads[-1].end if sim.uploads else clock.monotonic()
    sim.settle(end)
    result.end_s = end - sim.start
    result.final_committed_s = result.end_s if sim.taken else None
    return result
