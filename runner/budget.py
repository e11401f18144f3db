"""The session budget: how long this session may run, and when to checkpoint or stop.

Owns: the table of platform session limits, the session deadline, and the pure decisions
over a `BudgetContext` (`should_checkpoint`, `should_stop`, `steps_that_fit`, …) built from the
costs `costs.py` measures (`CostMeter`: seconds per optimizer step, blocking checkpoint cost,
background upload time) or assumes before measuring (the priors). `budgetsim.py` replays these decisions
on a fake clock (`relay plan`, the tests); `quota.py` counts Kaggle's weekly GPU quota.

Must not: act. Nothing here saves, uploads, sleeps or reads the real clock; the
session measures, builds a context and acts on the answer. The rules are
written out in docs/budget.md; keep the two in step.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from runner.clock import Clock
from runner.costs import CostMeter
from runner.errors import UsageError

# Default session length per platform tier, in hours; None: no limit. `session.hours`
# (`--hours`) overrides it. The numbers are observations, not guarantees (see
# /work/shared/research/session-anchors.md, sections 1 and 2, and docs/budget.md).
PLATFORM_LIMITS_H: dict[str, float | None] = {
    # Colab FAQ: VM lifetimes "can be as much as 12 hours", limits "may vary over time" and
    # "Colab does not publish these limits". We stay half an hour under the documented maximum:
    # a session that dies earlier loses at most checkpoint.every_min of work anyway, while a
    # guess far below 12 h would throw away GPU time in every long session.
    "colab-free": 11.5,
    # Colab Pro / Pro+: Google advertises up to 24 h of runtime for paid plans (not in the research
    # notes; the figure the issue gives). A non-T4 GPU is what marks the tier (env.tier_of).
    "colab-paid": 24.0,
    # Kaggle docs: GPU sessions run at most 12 h (9 h on TPU). The clock starts at VM boot
    # (/proc/uptime), which is never later than Kaggle's own session counter.
    "kaggle": 12.0,
    # A local machine has no platform limit; the run stops at its target or on a signal.
    "local": None,
}


def default_limit_h(tier: str) -> float | None:
    """The default session length of a platform tier (colab-free, colab-paid, kaggle, local)."""
    if tier not in PLATFORM_LIMITS_H:
        raise UsageError(
            f"unknown platform tier {tier!r}: no default session length",
            hint=f"known tiers: {', '.join(PLATFORM_LIMITS_H)}; or pass --hours",
        )
    return PLATFORM_LIMITS_H[tier]


def session_deadline(env: Any, profile: Any, clock: Clock) -> float | None:
    """The session's end on `clock.monotonic()`'s scale; None when there is no limit.

    `env` gives `session_start_wall` (VM boot or process start) and `session_limit_h`;
    `profile.session.hours` (set by `--hours`) overrides the limit when it is above 0.
    """
    hours = profile.session.hours or env.session_limit_h
    if not hours:
        return None
    end_wall = env.session_start_wall + hours * 3600.0
    return clock.monotonic() + (end_wall - clock.wall())


# ---------------------------------------------------------------- the decisions


@dataclass(frozen=True)
class BudgetContext:
    """Everything the budget decisions need, at one moment. All times in seconds on one monotonic clock."""

    now: float
    deadline: float | None
    """When the session ends; None: no limit."""
    step_s: float
    """Measured seconds per optimizer step."""
    checkpoint_cost_s: float
    """Blocking part of a checkpoint: training waits while it is captured and staged."""
    upload_s: float
    """Background part: upload until COMMIT.json; training goes on meanwhile."""
    last_checkpoint_at: float
    """When the last checkpoint's state was captured (staging began), or when training began."""
    every_min: float
    """Bound on work at risk, in minutes (checkpoint.every_min)."""
    max_overhead_pct: float
    """Checkpoint staging may take at most this share of training time (checkpoint.max_overhead_pct)."""
    margin_s: float
    """Safety margin: the final checkpoint is committed at least this long before the deadline."""
    steps_left: int
    """Optimizer steps until the run's target."""
    training_s: float = 0.0
    """Seconds spent in optimizer steps this session."""
    checkpoint_s: float = 0.0
    """Seconds spent staging checkpoints this session."""
    upload_left_s: float | None = None
    """Seconds until the upload in flight commits; 0: none in flight; None: unknown (assume a whole upload)."""


def context(
    profile: Any,
    meter: CostMeter,
    *,
    now: float,
    deadline: float | None,
    last_checkpoint_at: float,
    steps_left: int,
    train_s: float = 0.0,
    checkpoint_s: float = 0.0,
    upload_left_s: float | None = None,
) -> BudgetContext:
    """A BudgetContext from the profile's checkpoint/session settings and the measured costs."""
    return BudgetContext(
        now=now,
        deadline=deadline,
        step_s=meter.step_s,
        checkpoint_cost_s=meter.checkpoint_s,
        upload_s=meter.upload_s,
        last_checkpoint_at=last_checkpoint_at,
        every_min=profile.checkpoint.every_min,
        max_overhead_pct=profile.checkpoint.max_overhead_pct,
        margin_s=profile.session.margin_min * 60.0,
        steps_left=steps_left,
        training_s=train_s,
        checkpoint_s=checkpoint_s,
        upload_left_s=upload_left_s,
    )


def checkpoint_interval_s(ctx: BudgetContext) -> float:
    """Seconds between the captures of two periodic checkpoints: the exact rule.

    interval = max(every_min·60 − C − U,  C·(1 + 100/max_overhead_pct))

    The first term keeps the work at risk (time since the capture of the last
    *committed* checkpoint) under every_min: a capture is committed C + U after it
    is taken. The second keeps staging under max_overhead_pct of training time: C
    seconds of staging per (interval − C) seconds of training. When the second
    term is larger, the overhead cap wins and checkpoints come less often than
    the bound asks. A new checkpoint also waits for the upload in flight.
    """
    by_risk = ctx.every_min * 60.0 - ctx.checkpoint_cost_s - ctx.upload_s
    by_overhead = ctx.checkpoint_cost_s * (1.0 + 100.0 / ctx.max_overhead_pct)
    return max(by_risk, by_overhead, 0.0)


def work_at_risk_bound_s(ctx: BudgetContext) -> float:
    """The most work (seconds) the rule can leave uncommitted, with the context's costs.

    A capture waits for the interval and for the upload in flight, happens at the
    next step boundary, and is committed C + U later. Equals every_min·60 + one
    step whenever the bound wins and every_min·60 ≥ 2·(C + U).
    """
    cost = ctx.checkpoint_cost_s + ctx.upload_s
    return max(checkpoint_interval_s(ctx), cost) + cost + ctx.step_s


def _upload_left(ctx: BudgetContext) -> float:
    """Seconds of the in-flight upload still to go (a whole upload when unknown)."""
    return max(0.0, ctx.upload_s if ctx.upload_left_s is None else ctx.upload_left_s)


def steps_that_fit(ctx: BudgetContext) -> int:
    """Optimizer steps that can still run with the final checkpoint committed `margin_s` before the deadline.

    Periodic checkpoints in between are not counted: the loop asks again after every step.
    """
    if ctx.steps_left <= 0:
        return 0
    if ctx.deadline is None:
        return ctx.steps_left
    # A final checkpoint started after n steps commits at now + max(n·step, upload left) + C + U.
    available = ctx.deadline - ctx.margin_s - ctx.now - ctx.checkpoint_cost_s - ctx.upload_s
    if _upload_left(ctx) > available:
        return 0
    n = math.floor(available / max(ctx.step_s, 1e-9))
    return min(n, ctx.steps_left)


def is_checkpoint_due(ctx: BudgetContext) -> bool:
    """The interval has passed since the last capture and no upload is in flight."""
    if ctx.steps_left <= 0 or (ctx.upload_left_s or 0.0) > 0:
        return False
    return ctx.now - ctx.last_checkpoint_at >= checkpoint_interval_s(ctx)


def should_stop(ctx: BudgetContext) -> bool:
    """Stop now and take the final checkpoint.

    True when the target is reached, when one more step would leave no time to
    commit the final checkpoint `margin_s` before the deadline, or when a periodic
    checkpoint is due but taking it would leave no room for the final one (the
    final checkpoint then serves as the periodic one).
    """
    if steps_that_fit(ctx) == 0:
        return True
    if ctx.deadline is None or not is_checkpoint_due(ctx):
        return False
    # A periodic checkpoint now, then one step, then the final one behind the periodic upload.
    after_periodic = ctx.checkpoint_cost_s + ctx.step_s
    upload_then = max(0.0, ctx.upload_s - ctx.step_s)
    final_at = ctx.now + after_periodic + upload_then + ctx.checkpoint_cost_s + ctx.upload_s
    return final_at > ctx.deadline - ctx.margin_s


def should_checkpoint(ctx: BudgetContext) -> bool:
    """Take a periodic checkpoint now (after a step). Never True when `should_stop` is."""
    return is_checkpoint_due(ctx) and not should_stop(ctx)


class Action(enum.Enum):
    """What the session loop does next."""

    CONTINUE = "continue"  # train one more step
    CHECKPOINT = "checkpoint"  # take a periodic checkpoint now, then ask again
    STOP = "stop"  # stop; the session's final checkpoint follows


def next_action(ctx: BudgetContext, *, has_new_steps: bool = True) -> Action:
    """The one "what next" decision of the session loop (and of `simulate_session`, which replays it).

    `has_new_steps`: whether a step has run since the last checkpoint (a checkpoint of nothing new is
    never taken)."""
    if should_stop(ctx):
        return Action.STOP
    if has_new_steps and should_checkpoint(ctx):
        return Action.CHECKPOINT
    return Action.CONTINUE


@dataclass(frozen=True)
class TooShort:
    """Why a session cannot train even one step."""

    message: str
    rerun_helps: bool
    """False when a whole session of this length is too short: running it again can never make progress."""


def too_short_to_train(ctx: BudgetContext, session_s: float | None = None) -> TooShort | None:
    """Why not even one step fits, in words for the user; None when one does (or nothing is left to do).

    `session_s`: the session's whole length, when known, to tell whether a new session of the same
    length could train at all."""
    if ctx.steps_left <= 0 or ctx.deadline is None or steps_that_fit(ctx) > 0:
        return None
    left = max(0.0, ctx.deadline - ctx.now)
    need = ctx.margin_s + ctx.step_s + ctx.checkpoint_cost_s + ctx.upload_s
    why = (f"{_minutes(left)} left in this session, and one step with its checkpoint needs about "
           f"{_minutes(need)}: the {_minutes(ctx.margin_s)} safety margin (session.margin_min), a "
           f"{ctx.step_s:.1f} s step, {ctx.checkpoint_cost_s:.0f} s to stage the checkpoint and "
           f"{ctx.upload_s:.0f} s to upload it")  # fmt: skip
    if session_s is not None and session_s < need:
        return TooShort(f"nothing can be trained: {why}. A session of {_minutes(session_s)} is too short for "
                        "any progress", rerun_helps=False)  # fmt: skip
    return TooShort(f"no time to train a step: {why}. Run the same command in a new session to continue", True)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def time_left_s(ctx: BudgetContext) -> float | None:
    """Seconds until the session's deadline; None when there is none."""
    return None if ctx.deadline is None else max(0.0, ctx.deadline - ctx.now)


def next_checkpoint_in_s(ctx: BudgetContext) -> float:
    """Seconds until the next checkpoint (periodic or final) is due, for the dashboard."""
    in_flight = ctx.upload_left_s or 0.0  # as in is_checkpoint_due: unknown counts as none
    periodic = max(0.0, ctx.last_checkpoint_at + checkpoint_interval_s(ctx) - ctx.now, in_flight)
    if ctx.deadline is None:
        return periodic
    final = max(0.0, ctx.deadline - ctx.margin_s - ctx.now - _upload_left(ctx) - ctx.checkpoint_cost_s - ctx.upload_s)
    return min(periodic, final)


def training_fraction(training_s: float, session_s: float) -> float:
    """Share of the session spent in optimizer steps (reported when the session ends)."""
    return 0.0 if session_s <= 0 else min(1.0, max(0.0, training_s / session_s))


def estimate_upload_left_s(elapsed_s: float, upload_s: float) -> float:
    """Seconds still to go for an upload in flight for `elapsed_s`, given the measured `upload_s`.

    An upload that has outrun its estimate is assumed to need another quarter of it,
    never zero, so the deadline keeps room for it.
    """
    return max(upload_s - elapsed_s, 0.25 * upload_s)
