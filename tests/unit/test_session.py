"""The session's lifecycle with fakes for the trainer and the clock (the storage is a real local folder):
what it hands the budget, when it checkpoints and stops, the run's target, a session too short to train."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import budget, costs, events
from runner.clock import FakeClock
from runner.context import Options, build_context
from runner.env import detect_env
from runner.errors import EXIT_PREEMPTED, UsageError
from runner.leaserecord import holder_died_on, read_lease
from runner.runinfo import ensure_run_info, resolve_target, sets_target
from runner.session import Session
from runner.signals import install_stop_handlers
from runner.state import read_run_info


def context(tmp_path: Path, *overrides: str, hours: float | None = None, clock: FakeClock | None = None):
    clock = clock or FakeClock()
    opts = Options(profile="tiny", storage=str(tmp_path / "storage"), overrides=overrides, hours=hours,
                   plain=True, workdir=str(tmp_path / "work"))  # fmt: skip
    ctx = build_context(opts, clock=clock, env=detect_env(clock=clock, workdir=str(tmp_path / "work")))
    seen: list[events.Event] = []
    ctx.bus.subscribe(seen.append)
    return ctx, clock, seen


# ---------------------------------------------------------------- fakes of the training side


@dataclass
class FakeSnapshot:
    step: int
    nbytes: int = 4

    def write(self, directory: Path) -> dict:
        (directory / "lora.safetensors").write_bytes(b"lora")
        return {"step": self.step}


@dataclass(frozen=True)
class FakePlacement:
    device: str = "cpu"
    rank: int = 0
    world: int = 1


class FakeTrainingRun:
    """Steps that take `step_s` on the fake clock; records what the session asked of it. `during_step` runs
    in each step (the real step takes real time, in which the upload worker commits)."""

    def __init__(self, clock: FakeClock, step_s: float, during_step=lambda: None) -> None:
        self.clock, self.step_s, self.steps, self.snapshots = clock, step_s, [], []
        self.during_step = during_step
        self.placement = FakePlacement()
        self.trainer = type("T", (), {"compiled": None})()
        self.plan = type("P", (), {"to_dict": lambda _: {"micro_batch": 1, "grad_accum": 1}})()  # the fit's plan

    def step(self, step: int):
        self.clock.advance(self.step_s)
        self.during_step()
        self.steps.append(step)
        fields = {"seconds": self.step_s, "setup_s": 0.0, "loss": 0.1, "lr": 1e-4, "grad_norm": 1.0, "skipped": False}
        return type("R", (), fields)()

    def step_event(self, step_done: int, result) -> events.StepDone:
        return events.StepDone(step=step_done, target=0, loss=0.1, lr=1e-4, step_s=result.seconds)

    def snapshot_state(self) -> FakeSnapshot:
        self.snapshots.append(self.steps[-1] + 1)
        return FakeSnapshot(self.steps[-1] + 1)

    def validation_loss(self) -> None:
        return None


def run_loop(session: Session, tr: FakeTrainingRun, deadline: float | None, step_from: int = 0) -> int:
    from runner.runinfo import new_state

    state = new_state(session.ctx)
    session.step_from = session.step = step_from
    session.lease.acquire()  # as run() does: every write of the loop is fenced by the lease
    step = tr.step

    def step_and_beat(n: int):  # the heartbeat thread's work, done in step with the fake clock
        session.lease.heartbeat()
        return step(n)

    tr.step = step_and_beat
    with install_stop_handlers() as stop:
        try:
            return session._loop(tr, state, deadline, stop)
        finally:
            session.ckpts.close()


# ---------------------------------------------------------------- tests


def test_the_budget_is_handed_the_upload_still_in_flight(tmp_path):
    ctx, clock, _ = context(tmp_path)
    session = Session(ctx)
    assert session._budget(None, clock.monotonic(), 10).upload_left_s == 0.0  # nothing in flight
    session.upload_started = clock.monotonic()
    clock.advance(5.0)
    in_flight = session._budget(None, clock.monotonic(), 10)
    assert in_flight.upload_left_s == pytest.approx(budget.estimate_upload_left_s(5.0, session.meter.upload_s))
    assert in_flight.upload_left_s > 0 and not budget.is_checkpoint_due(in_flight)
    ctx.bus.emit(events.CheckpointCommitted(step=3, bytes=4, upload_s=7.0))  # the upload worker's event
    assert session.upload_started is None and session._budget(None, clock.monotonic(), 10).upload_left_s == 0.0
    assert session.meter.upload_s == 7.0  # measured costs replace the priors


def test_the_loop_checkpoints_on_the_budgets_schedule_and_stops_before_the_deadline(tmp_path):
    ctx, clock, seen = context(tmp_path, "checkpoint.every_min=1", "checkpoint.max_overhead_pct=50",
                               "session.margin_min=1", "train.steps=1000")  # fmt: skip
    session = Session(ctx)
    tr = FakeTrainingRun(clock, step_s=10.0, during_step=session.ckpts.wait)  # uploads shorter than a step
    deadline = clock.monotonic() + 600.0
    code = run_loop(session, tr, deadline)
    assert code == EXIT_PREEMPTED and session.reason == "budget"
    assert tr.steps == list(range(len(tr.steps))) and 0 < len(tr.steps) < 60
    assert clock.monotonic() <= deadline - 60.0  # the margin is kept
    committed = [e.step for e in seen if isinstance(e, events.CheckpointCommitted)]
    assert committed and committed[-1] == len(tr.steps)  # the session's last step is committed
    assert len(tr.snapshots) >= 3  # periodic checkpoints, about one a minute, before the final one
    # every view hears the budget as events (relay attach and the notebook cell render from the events log)
    budgets = [e for e in seen if isinstance(e, events.BudgetUpdated)]
    assert len(budgets) >= 10 and all(e.time_left_s <= 600.0 for e in budgets)
    assert any(e.next_checkpoint_in_s is not None and 0 < e.next_checkpoint_in_s <= 60.0 for e in budgets)


def test_a_session_too_short_for_any_step_is_refused_with_the_reason(tmp_path):
    ctx, clock, seen = context(tmp_path, hours=0.05)  # 3 minutes: the default margin alone is 3 minutes
    session = Session(ctx)
    from runner.runinfo import new_state

    with pytest.raises(UsageError) as info:
        session._has_time_to_train(new_state(ctx))
    assert "nothing can be trained" in str(info.value) and "session.margin_min" in str(info.value)
    assert "--hours" in info.value.hint


def test_a_session_near_its_end_says_why_it_trains_nothing(tmp_path):
    ctx, clock, seen = context(tmp_path, hours=1.0)
    clock.advance(3600 - 100)  # 100 s left of an hour-long session
    session = Session(ctx)
    from runner.runinfo import new_state

    assert not session._has_time_to_train(new_state(ctx))
    warning = [e for e in seen if isinstance(e, events.Warning) and e.kind == "budget"]
    assert warning and "no time to train a step" in warning[0].message and "new session" in warning[0].message


def test_the_first_measured_step_replaces_the_prior():
    meter = costs.CostMeter(step_prior_s=50.0)
    assert meter.step_s == 50.0
    meter.add_step(0.5)
    assert meter.step_s == 0.5


def test_step_priors_per_gpu_class_scale_with_pixels_and_batch():
    t4 = costs.step_prior("Tesla T4", resolution=1024, micro_batch=1, grad_accum=1)
    assert (t4.gpu_class, t4.step_s) == ("t4", pytest.approx(0.842))
    assert costs.step_prior("1× Tesla T4", resolution=512, micro_batch=2, grad_accum=4).step_s == pytest.approx(
        0.842 / 4 * 8
    )
    assert costs.step_prior("NVIDIA H200", resolution=1024, micro_batch=1, grad_accum=1).gpu_class == "h200"
    assert costs.step_prior("Tesla P100-PCIE-16GB", resolution=1024, micro_batch=1, grad_accum=1).gpu_class == (
        "generic"
    )


# ---------------------------------------------------------------- the run's target


def test_the_stored_target_wins_unless_changed_on_purpose(tmp_path):
    assert resolve_target(None, 40, explicit=False) == 40  # a new run: the profile's
    assert resolve_target(150, 40, explicit=False) == 150  # the profile's default does not shrink the run
    assert resolve_target(150, 200, explicit=True) == 200
    assert sets_target(("data.flip=false", " train.steps =300")) and not sets_target(("train.steps_x=1",))

    ctx, _, seen = context(tmp_path, "train.steps=150")
    assert ensure_run_info(ctx, force=False).target == 150
    ctx, _, seen = context(tmp_path)  # the profile's 40, not asked for
    assert ensure_run_info(ctx, force=False).target == 150 and not [e for e in seen if e.kind == "target"]
    ctx, _, seen = context(tmp_path, "train.steps=200")
    assert ensure_run_info(ctx, force=False).target == 200
    assert [e.message for e in seen if isinstance(e, events.Warning) and e.kind == "target"] == [
        "target changed from 150 to 200 steps"
    ]
    assert read_run_info(ctx.storage, ctx.run).target == 200


# ---------------------------------------------------------------- the lease of a dead process


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once_one_of_another_host_is_not():
    alive = {111}
    running = alive.__contains__
    assert holder_died_on("local:box:pid222:abc", "box", running)  # gone, on this machine
    assert not holder_died_on("local:box:pid111:abc", "box", running)  # still running: a real second session
    assert not holder_died_on("kaggle:other:pid222:abc", "box", running)  # another machine: cannot tell
    assert not holder_died_on("garbled", "box", running) and not holder_died_on("a:box:pidx:s", "box", running)


def test_the_session_takes_over_the_lease_of_a_dead_process_of_this_host(tmp_path, monkeypatch):
    import runner.session as session_module

    ctx, clock, seen = context(tmp_path)
    record = {"holder": f"local:{ctx.env.host}:pid999999:old", "token": "t", "since": "",
              "heartbeat_wall": clock.wall(), "timeout_s": 300}  # fmt: skip
    key = Path(tmp_path / "storage" / ctx.run / "lease.json")
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(record))
    monkeypatch.setattr(session_module, "pid_is_running", lambda pid: False)
    assert Session(ctx)._holder_died_here()
    monkeypatch.setattr(session_module, "pid_is_running", lambda pid: True)
    assert not Session(ctx)._holder_died_here()
    assert read_lease(ctx.storage, ctx.run).holder == record["holder"]


def test_status_and_plan_show_the_same_target_the_session_trains_for(tmp_path):
    """relay status read run.json's target while relay plan printed the profile's: 0 / 60 beside 0 / 40."""
    import io

    from rich.console import Console

    from runner.planning import print_plan
    from runner.report import read_status

    ctx, _, _ = context(tmp_path, "train.steps=60")
    ensure_run_info(ctx, force=False)

    def plan_line(*overrides: str) -> str:
        out = io.StringIO()
        print_plan(context(tmp_path, *overrides)[0], console=Console(file=out, width=200))
        return next(line for line in out.getvalue().splitlines() if line.startswith("progress:"))

    assert read_status(ctx.storage, ctx.run).target == 60
    assert plan_line() == "progress: step 0 / 60; 60 steps to go"  # the profile says 40: the run says 60
    assert plan_line("train.steps=80") == "progress: step 0 / 80; 80 steps to go"  # changed on purpose


def test_the_ranks_are_read_once_into_the_context_and_only_rank_0_writes(tmp_path):
    from dataclasses import replace

    from runner.context import Ranks
    from runner.storage.fenced import FencedStorage

    ranks = Ranks.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29500"})
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.launched, ranks.is_main) == (1, 2, 1, True, False)
    assert Ranks.from_environ({}) == Ranks() and Ranks().is_main and not Ranks().launched

    ctx, _, _ = context(tmp_path)
    assert Session(ctx).is_main and isinstance(Session(ctx).fenced, FencedStorage)  # rank 0 writes, fenced
    other = Session(replace(ctx, ranks=ranks))
    assert not other.is_main and other.fenced is ctx.storage  # a rank that never writes needs no fence


def test_an_upload_still_running_at_the_sessions_deadline_is_said(tmp_path):
    """The VM may go before a late upload commits: the user is told what that means, not left to guess."""
    ctx, clock, seen = context(tmp_path)
    session = Session(ctx)

    class Uploads:
        def __init__(self, done_in_s: float | None, error: str | None = None) -> None:
            self.done_in_s, self.last_error, self.waits = done_in_s, error, []

        def wait(self, timeout_s=None) -> bool:
            self.waits.append(timeout_s)
            return self.last_error is None and (timeout_s is None or self.done_in_s <= timeout_s)

    def warnings() -> list[str]:
        return [e.message for e in seen if isinstance(e, events.Warning) and e.kind == "upload"]

    session.ckpts = Uploads(done_in_s=90.0)
    session._say_if_upload_outlasts(clock.monotonic() + 30.0, step=7)
    assert session.ckpts.waits == [30.0]  # it waits for the upload only as long as the session has left
    assert len(warnings()) == 1 and "step 7 is still uploading" in warnings()[0]
    assert "resumes from the checkpoint before it" in warnings()[0]
    session.ckpts = Uploads(done_in_s=10.0)
    session._say_if_upload_outlasts(clock.monotonic() + 30.0, step=8)
    session.ckpts = Uploads(done_in_s=10.0, error="HTTP 500")  # a failure is the caller's to report
    session._say_if_upload_outlasts(clock.monotonic() + 30.0, step=9)
    session._say_if_upload_outlasts(None, step=10)  # no deadline: nothing to outlast
    assert len(warnings()) == 1
