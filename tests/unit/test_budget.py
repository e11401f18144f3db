"""Session budget: platform limits, measured costs, the checkpoint/stop rules, and a
simulation across many sessions showing the final checkpoint always lands before
the deadline, the work at risk stays within its bound, and most of the session trains."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from runner import budget, budgetsim, quota
from runner.budget import BudgetContext
from runner.clock import FakeClock
from runner.costs import CostMeter
from runner.errors import UsageError
from runner.profile import build_profile


def make_ctx(**kw) -> BudgetContext:
    values = dict(
        now=1000.0,
        deadline=1000.0 + 3600.0,
        step_s=10.0,
        checkpoint_cost_s=10.0,
        upload_s=60.0,
        last_checkpoint_at=1000.0,
        every_min=10.0,
        max_overhead_pct=2.0,
        margin_s=180.0,
        steps_left=10_000,
        upload_left_s=0.0,
    )
    values.update(kw)
    return BudgetContext(**values)


# ---------------------------------------------------------------- limits and deadline


def test_platform_limits_cover_every_tier_env_reports():
    assert budget.default_limit_h("kaggle") == 12.0
    assert budget.default_limit_h("colab-paid") == 24.0
    assert budget.default_limit_h("local") is None
    assert 0 < budget.default_limit_h("colab-free") <= 12.0  # never above Colab's documented maximum


def test_unknown_tier_names_the_known_ones():
    with pytest.raises(UsageError, match="kaggle") as err:
        budget.default_limit_h("paperspace")
    assert "--hours" in str(err.value)


def test_deadline_counts_from_vm_boot_not_from_process_start():
    clock = FakeClock()
    clock.advance(50.0)
    env = SimpleNamespace(session_start_wall=clock.wall() - 3600.0, session_limit_h=12.0)  # VM up for an hour
    deadline = budget.session_deadline(env, build_profile({}), clock)
    assert deadline == pytest.approx(clock.monotonic() + 11 * 3600.0)


def test_hours_override_the_platform_limit_and_local_has_none():
    clock = FakeClock()
    env = SimpleNamespace(session_start_wall=clock.wall(), session_limit_h=12.0)
    assert budget.session_deadline(env, build_profile({"session": {"hours": 2}}), clock) == pytest.approx(7200.0)
    local = SimpleNamespace(session_start_wall=clock.wall(), session_limit_h=None)
    assert budget.session_deadline(local, build_profile({}), clock) is None
    assert budget.session_deadline(local, build_profile({"session": {"hours": 1.5}}), clock) == pytest.approx(5400.0)


# ---------------------------------------------------------------- measured costs


def test_cost_meter_uses_priors_until_measured():
    meter = CostMeter(step_prior_s=7.0, checkpoint_prior_s=3.0, upload_prior_s=40.0)
    assert (meter.step_s, meter.checkpoint_s, meter.upload_s) == (7.0, 3.0, 40.0)
    meter.add_upload(100.0)
    assert meter.upload_s == 100.0


def test_cost_meter_ignores_a_slow_first_step_and_bad_samples():
    meter = CostMeter()
    for seconds in (60.0, 2.0, 2.1, 1.9, float("nan"), -1.0, float("inf")):
        meter.add_step(seconds)
    assert meter.step.count == 4
    assert meter.step_s == pytest.approx(2.05)


def test_cost_meter_follows_a_change_of_pace():
    meter = CostMeter(window=10)
    for _ in range(10):
        meter.add_step(2.0)
    for _ in range(6):
        meter.add_step(5.0)
    assert meter.step_s == 5.0


def test_context_takes_settings_from_the_profile():
    profile = build_profile({"checkpoint": {"every_min": 5, "max_overhead_pct": 3}, "session": {"margin_min": 2}})
    ctx = budget.context(profile, CostMeter(4.0, 5.0, 6.0), now=1.0, deadline=9.0, last_checkpoint_at=0.5, steps_left=3)
    assert (ctx.every_min, ctx.max_overhead_pct, ctx.margin_s) == (5.0, 3.0, 120.0)
    assert (ctx.step_s, ctx.checkpoint_cost_s, ctx.upload_s) == (4.0, 5.0, 6.0)
    assert ctx.upload_left_s is None  # unknown unless the session says


# ---------------------------------------------------------------- checkpoint rule


def test_interval_keeps_commits_within_the_bound():
    ctx = make_ctx(checkpoint_cost_s=10.0, upload_s=60.0)
    assert budget.checkpoint_interval_s(ctx) == 600.0 - 10.0 - 60.0  # captured 530 s apart, committed 70 s later
    assert budget.work_at_risk_bound_s(ctx) == 600.0 + ctx.step_s


def test_interval_stretches_when_checkpoints_are_expensive():
    ctx = make_ctx(checkpoint_cost_s=30.0, max_overhead_pct=2.0)
    interval = budget.checkpoint_interval_s(ctx)
    assert interval == pytest.approx(30.0 * 51)  # 30 s staging per 1500 s of training = 2 %
    assert 30.0 / (interval - 30.0) == pytest.approx(0.02)


def test_checkpoint_due_only_after_the_interval():
    ctx = make_ctx(last_checkpoint_at=1000.0)
    assert not budget.should_checkpoint(replace(ctx, now=1000.0 + 529.0))
    assert budget.should_checkpoint(replace(ctx, now=1000.0 + 530.0))


def test_no_checkpoint_while_an_upload_is_in_flight_or_when_done():
    ctx = make_ctx(now=2000.0, deadline=None)
    assert budget.should_checkpoint(ctx)
    assert not budget.should_checkpoint(replace(ctx, upload_left_s=5.0))
    assert not budget.should_checkpoint(replace(ctx, steps_left=0))


# ---------------------------------------------------------------- stop rule


def test_stop_when_the_target_is_reached():
    assert budget.should_stop(make_ctx(steps_left=0, deadline=None))
    assert not budget.should_stop(make_ctx(steps_left=1, deadline=None))
    assert budget.steps_that_fit(make_ctx(steps_left=7, deadline=None)) == 7


def test_never_starts_a_step_that_would_make_the_final_commit_late():
    # Final commit needs C + U = 70 s, the margin 180 s: the last step must end by deadline − 250.
    deadline = 5000.0
    last_start = deadline - 250.0 - 10.0
    ctx = make_ctx(now=last_start, deadline=deadline, last_checkpoint_at=last_start)  # no periodic one due
    assert not budget.should_stop(ctx)
    assert budget.steps_that_fit(ctx) == 1
    assert budget.should_stop(replace(ctx, now=last_start + 0.001))
    assert budget.steps_that_fit(replace(ctx, now=last_start - 100.0)) == 11


def test_an_upload_in_flight_delays_the_final_commit():
    deadline = 5000.0
    now = deadline - 250.0 - 10.0  # one step fits with nothing in flight
    ctx = make_ctx(now=now, deadline=deadline, last_checkpoint_at=now)
    assert not budget.should_stop(replace(ctx, upload_left_s=10.0))
    assert budget.should_stop(replace(ctx, upload_left_s=11.0))
    assert budget.should_stop(replace(ctx, upload_left_s=None))  # unknown: a whole upload


def test_final_checkpoint_replaces_a_periodic_one_near_the_deadline():
    # Due for a periodic checkpoint, but after it (10 s) and one step (10 s) the final one would be late.
    ctx = make_ctx(now=5000.0 - 180.0 - 139.0, deadline=5000.0, last_checkpoint_at=0.0)
    assert budget.steps_that_fit(ctx) > 0
    assert budget.should_stop(ctx)
    assert not budget.should_checkpoint(ctx)
    earlier = replace(ctx, now=ctx.now - 200.0)
    assert budget.should_checkpoint(earlier) and not budget.should_stop(earlier)


def test_dashboard_figures():
    ctx = make_ctx(now=1000.0, deadline=4600.0, last_checkpoint_at=900.0)
    assert budget.time_left_s(ctx) == 3600.0
    assert budget.next_checkpoint_in_s(ctx) == 430.0
    late = replace(ctx, now=4000.0, last_checkpoint_at=3900.0)
    assert budget.next_checkpoint_in_s(late) == pytest.approx(4600.0 - 180.0 - 70.0 - 4000.0)  # the final one
    assert budget.time_left_s(replace(ctx, deadline=None)) is None
    assert budget.next_checkpoint_in_s(replace(ctx, upload_left_s=None)) == 430.0  # unknown upload: no wait shown
    assert budget.next_checkpoint_in_s(replace(ctx, upload_left_s=500.0)) == 500.0  # waits for the upload
    assert budget.training_fraction(950.0, 1000.0) == 0.95
    assert budget.training_fraction(1.0, 0.0) == 0.0


# ---------------------------------------------------------------- simulation


def noisy(base: float, rng: random.Random, spread: float = 0.2):
    """A cost callable: base ± spread, drawn once per index (so repeat calls agree)."""
    draws: dict[int, float] = {}
    return lambda i: draws.setdefault(i, base * rng.uniform(1 - spread, 1 + spread))


def random_case(rng: random.Random) -> dict:
    hours = rng.choice([0.5, 1.0, 2.0, 4.0, 8.0, 12.0])
    step_s = rng.choice([0.5, 2.0, 5.0, 12.0, 30.0])
    if hours * 3600 / step_s > 30_000:  # keep the unit suite fast; the slow grid covers the rest
        step_s = 5.0
    return dict(
        hours=hours,
        step_s=step_s,
        checkpoint_s=rng.choice([1.0, 5.0, 15.0, 40.0]),
        upload_s=rng.choice([1.0, 20.0, 60.0, 150.0, 300.0]),
    )


def run_case(case: dict, rng: random.Random, *, exact_costs: bool) -> budgetsim.SimResult:
    """Steps always noisy ±20 %; checkpoint and upload costs exact (priors = truth) or noisy with default priors."""
    if exact_costs:
        costs = dict(checkpoint_s=case["checkpoint_s"], upload_s=case["upload_s"])
        meter = CostMeter(case["step_s"], case["checkpoint_s"], case["upload_s"])
    else:
        costs = dict(checkpoint_s=noisy(case["checkpoint_s"], rng), upload_s=noisy(case["upload_s"], rng))
        meter = CostMeter()
    return budgetsim.simulate_session(
        hours=case["hours"],
        steps_left=10**7,
        step_s=noisy(case["step_s"], rng),
        meter=meter,
        clock=FakeClock(),
        **costs,
    )


def check_session(case: dict, result: budgetsim.SimResult, *, exact_costs: bool) -> None:
    deadline = case["hours"] * 3600
    assert result.final_committed_s is not None, case
    assert result.final_committed_s <= deadline, case  # the final checkpoint is committed in time
    assert result.end_s <= deadline, case
    if not exact_costs:
        return
    step_max = case["step_s"] * 1.2
    ctx = make_ctx(step_s=step_max, checkpoint_cost_s=case["checkpoint_s"], upload_s=case["upload_s"])
    assert result.max_work_at_risk_s <= budget.work_at_risk_bound_s(ctx) + 1e-6, case
    cost = case["checkpoint_s"] + case["upload_s"]
    if budget.checkpoint_interval_s(ctx) == 600.0 - cost and 600.0 >= 2 * cost:  # the bound wins
        assert result.max_work_at_risk_s <= 600.0 + step_max + 1e-6, case
    assert result.checkpoint_s <= 0.02 * result.training_s + 1e-6, case  # the overhead cap
    lost_s = 180.0 + 3 * cost + 2 * step_max  # margin, final + in-flight + replaced periodic, step rounding
    assert result.training_fraction >= 1 - 0.02 - lost_s / deadline, case


@pytest.mark.parametrize("exact_costs", [True, False])
def test_simulated_sessions_commit_in_time_and_bound_the_risk(exact_costs):
    rng = random.Random(20261122)
    for _ in range(25):
        case = random_case(rng)
        check_session(case, run_case(case, rng, exact_costs=exact_costs), exact_costs=exact_costs)


def test_reasonable_costs_train_over_90_percent_of_the_session():
    rng = random.Random(7)
    for hours in (2.0, 6.0, 12.0):
        for step_s, checkpoint_s, upload_s in ((10.0, 10.0, 60.0), (2.0, 5.0, 30.0), (30.0, 20.0, 120.0)):
            case = dict(hours=hours, step_s=step_s, checkpoint_s=checkpoint_s, upload_s=upload_s)
            result = run_case(case, rng, exact_costs=False)
            assert result.training_fraction > 0.9, (case, result.training_fraction)
            interval = budget.checkpoint_interval_s(make_ctx(checkpoint_cost_s=checkpoint_s, upload_s=upload_s))
            assert result.checkpoints >= int(hours * 3600 / (interval + 1.2 * step_s)) - 1


def test_expensive_checkpoints_follow_the_overhead_cap_not_the_bound():
    case = dict(hours=4.0, step_s=5.0, checkpoint_s=40.0, upload_s=20.0)
    result = run_case(case, random.Random(3), exact_costs=True)
    interval = 40.0 * 51  # 2040 s between captures, not 540
    assert result.checkpoints == int((4 * 3600 - 180) / interval)
    assert result.max_work_at_risk_s > 600.0  # over the bound, as the cap allows …
    assert result.max_work_at_risk_s <= interval + 60.0 + 6.0 + 1e-6  # … and no further


def test_nothing_to_commit_when_no_step_fits():
    result = budgetsim.simulate_session(hours=0.05, steps_left=100, step_s=10.0, checkpoint_s=10.0, upload_s=60.0)
    assert result.steps == 0 and result.final_committed_s is None


def test_unlimited_session_trains_to_the_target_and_commits_it():
    result = budgetsim.simulate_session(hours=0, steps_left=500, step_s=3.0, checkpoint_s=2.0, upload_s=10.0)
    assert result.steps == 500
    assert result.final_committed_s == pytest.approx(result.end_s)
    assert result.checkpoints == pytest.approx(1500 / 528, abs=1)


@pytest.mark.slow
def test_simulation_grid_full_range():
    rng = random.Random(1)
    for hours in (0.5, 1.0, 3.0, 12.0):
        for step_s in (0.5, 3.0, 30.0):
            for checkpoint_s in (1.0, 30.0):
                for upload_s in (1.0, 60.0, 300.0):
                    case = dict(hours=hours, step_s=step_s, checkpoint_s=checkpoint_s, upload_s=upload_s)
                    for exact in (True, False):
                        check_session(case, run_case(case, rng, exact_costs=exact), exact_costs=exact)


# ---------------------------------------------------------------- Kaggle quota


NOW = 1_800_000_000.0
H = 3600.0


def test_quota_counts_this_accounts_kaggle_gpu_hours_of_the_last_week():
    sessions = [
        {"platform": "kaggle", "account": "ann", "start_wall": NOW - 30 * H, "end_wall": NOW - 20 * H, "gpu_count": 1},
        {"platform": "kaggle", "account": "ann", "start_wall": NOW - 5 * H, "end_wall": NOW - 2 * H, "gpu_count": 2},
        {"platform": "kaggle", "account": "bob", "start_wall": NOW - 5 * H, "end_wall": NOW - 1 * H},
        {"platform": "colab", "account": "ann", "start_wall": NOW - 5 * H, "end_wall": NOW - 1 * H},
        {"platform": "kaggle", "account": "ann", "start_wall": NOW - 8 * 24 * H, "end_wall": NOW - 7 * 24 * H + 2 * H},
    ]
    # 10 h + 3 h (two GPUs count once: the quota counts session hours) + the 2 h inside the 7-day window
    assert quota.kaggle_quota_left_h(sessions, NOW, "ann") == pytest.approx(30 - 10 - 3 - 2)


def test_quota_counts_a_running_session_and_iso_times():
    sessions = [{"platform": "kaggle", "start_wall": "2027-01-15T06:00:00Z", "end_wall": None}]
    now = quota._wall("2027-01-15T10:00:00+00:00")
    assert quota.kaggle_quota_left_h(sessions, now, "ann") == pytest.approx(26.0)
    assert quota.kaggle_quota_left_h(sessions * 10, now, "ann") == 0.0


def test_quota_warning_only_when_the_run_cannot_finish():
    assert quota.quota_warning(10.0, steps_left=1000, step_s=30.0) is None  # 8.3 h needed
    message = quota.quota_warning(5.0, steps_left=1000, step_s=30.0)
    assert "8.3" in message and "5.0" in message
    assert quota.quota_warning(10.0, steps_left=1000, step_s=30.0, gpu_count=2) is None  # no ×2 for two GPUs
    assert "no Kaggle GPU quota left" in quota.quota_warning(0.0, steps_left=1, step_s=1.0)
