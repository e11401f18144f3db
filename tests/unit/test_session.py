"""The session's lifecycle, built by the wiring from fakes of its parts (the training side, the caches, what it
leaves when it ends, sometimes the checkpoints) on a fake clock; the storage is a real local folder: what it
hands the budget, when it checkpoints and stops, the run's target, a session too short to train."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import costs, events
from runner.clock import FakeClock
from runner.context import Options, build_context
from runner.env import detect_env
from runner.errors import EXIT_OK, EXIT_PREEMPTED, LeaseHeld, StorageError, UsageError
from runner.lease import Lease
from runner.leaserecord import holder_died_on, read_lease
from runner.runinfo import ensure_run_info, resolve_target, sets_target
from runner.state import read_run_info
from runner.wiring import wire


def context(tmp_path: Path, *overrides: str, hours: float | None = None, clock: FakeClock | None = None):
    clock = clock or FakeClock()
    opts = Options(profile="tiny", storage=str(tmp_path / "storage"), overrides=overrides, hours=hours,
                   plain=True, workdir=str(tmp_path / "work"))  # fmt: skip
    ctx = build_context(opts, clock=clock, env=detect_env(clock=clock, workdir=str(tmp_path / "work")))
    seen: list[events.Event] = []
    ctx.bus.subscribe(seen.append)
    return ctx, clock, seen


# ---------------------------------------------------------------- fakes of the session's parts


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
    in each step (the real step takes real time, in which the upload worker commits and the lease is renewed)."""

    def __init__(self, clock: FakeClock, step_s: float, during_step) -> None:
        self.clock, self.step_s, self.steps, self.snapshots = clock, step_s, [], []
        self.during_step = during_step
        self.placement = FakePlacement()
        self.trainer = type("T", (), {"compiled": None})()
        self.plan = type("P", (), {"to_dict": lambda _: {"micro_batch": 1, "grad_accum": 1}})()  # the fit's plan
        self.unet = None

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

    def lora_weights(self) -> dict:
        return {"lora": len(self.steps)}


class FakeTraining:
    """The training side: one FakeTrainingRun, started when the session gets that far."""

    def __init__(self, clock: FakeClock, step_s: float = 10.0) -> None:
        self.clock, self.step_s, self.run = clock, step_s, None
        self.during_step = lambda: None

    def place(self, ctx):
        return FakePlacement()

    def agree(self, placement, *flags: bool) -> tuple[bool, ...]:
        return flags

    def start(self, ctx, cache_dir, placement, state):
        self.run = FakeTrainingRun(self.clock, self.step_s, lambda: self.during_step())
        return self.run

    def close(self) -> None:
        pass


class FakeCaches:
    def __init__(self, tmp_path: Path) -> None:
        self.folder, self.asked = tmp_path / "cache", []

    def fingerprint(self) -> str:
        return "fp"

    def latent_cache(self, placement) -> Path:
        self.asked.append("latent-cache")
        return self.folder

    def restore_compile_cache(self, placement) -> None:
        self.asked.append("compile-cache")

    def store_compile_cache(self, tr) -> None:
        pass


class FakeFinish:
    """What the session leaves when it ends, recorded instead of written."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, *args))

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


class FakeCheckpoints:
    """Checkpoints staged instantly; each upload is held until the test commits it (the worker's event), and
    `wait(timeout_s)` says whether it would commit within that time (`done_in_s`) or failed (`error`)."""

    def __init__(self, bus, done_in_s: float = 0.0, error: str | None = None) -> None:
        self.bus, self.done_in_s, self.last_error = bus, done_in_s, error
        self.staged: list[int] = []
        self.waits: list[float | None] = []

    def latest(self, local_dir):
        return None

    def stage_snapshot(self, step, take, state=None):
        take()
        self.staged.append(step)
        return type("Staged", (), {"step": step, "stage_s": 0.5, "dir": None})()

    def submit(self, staged) -> None:
        pass

    def commit(self, upload_s: float) -> None:
        self.bus.emit(events.CheckpointCommitted(step=self.staged[-1], bytes=4, upload_s=upload_s))

    def check(self) -> None:
        pass

    def wait(self, timeout_s=None) -> bool:
        self.waits.append(timeout_s)
        return self.last_error is None and (timeout_s is None or self.done_in_s <= timeout_s)

    def close(self, timeout_s=None) -> bool:
        return True


def wired(ctx, clock: FakeClock, tmp_path: Path, **parts):
    """A session of `ctx` from fakes (the lease and, unless given, the checkpoints are real); the fake steps
    renew the lease as the heartbeat thread would on real time."""
    training = FakeTraining(clock)
    parts = {"training": training, "caches": FakeCaches(tmp_path), "finish": FakeFinish(), **parts}
    session = wire(ctx, **parts)
    training.during_step = session.lease.heartbeat
    return session


def started_at(seen: list[events.Event]) -> float | None:
    """The deadline's time left at the start of training, from the SessionStarted event."""
    return next(e.time_left_s for e in seen if isinstance(e, events.SessionStarted))


# ---------------------------------------------------------------- tests


def test_the_budget_is_handed_the_upload_still_in_flight(tmp_path):
    """No periodic checkpoint while one is uploading, however long it takes; its measured time replaces the prior."""
    ctx, clock, seen = context(tmp_path, "checkpoint.every_min=1", "train.steps=40", hours=1.0)
    ckpts = FakeCheckpoints(ctx.bus)
    session = wired(ctx, clock, tmp_path, ckpts=ckpts)
    training = session.training

    def during_step() -> None:
        session.lease.heartbeat()
        if len(training.run.steps) == 20:  # 200 s of steps, and the first checkpoint is still uploading
            assert len(ckpts.staged) == 1 and ckpts.staged[0] < 15  # the 1-minute interval passed long ago
            ckpts.commit(upload_s=7.0)  # the upload worker's event

    training.during_step = during_step
    assert session.run() == EXIT_OK
    assert ckpts.staged[1] == 21  # due at once when the upload that held it commits
    assert session.meter.upload_s == 7.0  # measured costs replace the priors


def test_the_loop_checkpoints_on_the_budgets_schedule_and_stops_before_the_deadline(tmp_path):
    ctx, clock, seen = context(tmp_path, "checkpoint.every_min=1", "checkpoint.max_overhead_pct=50",
                               "session.margin_min=1", "train.steps=1000", hours=600 / 3600)  # fmt: skip
    session = wired(ctx, clock, tmp_path)  # the real checkpoint manager, on the local folder
    deadline = 600.0  # the session started at 0 on the fake clock

    def during_step() -> None:  # uploads shorter than a step
        session.ckpts.wait()
        session.lease.heartbeat()

    session.training.during_step = during_step
    code = session.run()
    tr = session.training.run
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
    session = wired(ctx, clock, tmp_path)
    with pytest.raises(UsageError) as info:
        session.run()
    assert "nothing can be trained" in str(info.value) and "session.margin_min" in str(info.value)
    assert "--hours" in info.value.hint
    assert session.training.run is None and not session.caches.asked  # refused before any setup


def test_a_session_near_its_end_says_why_it_trains_nothing(tmp_path):
    ctx, clock, seen = context(tmp_path, hours=1.0)
    clock.advance(3600 - 100)  # 100 s left of an hour-long session
    session = wired(ctx, clock, tmp_path)
    assert session.run() == EXIT_PREEMPTED and session.reason == "budget"
    warning = [e for e in seen if isinstance(e, events.Warning) and e.kind == "budget"]
    assert warning and "no time to train a step" in warning[0].message and "new session" in warning[0].message
    assert session.training.run is None and not session.caches.asked  # no cache is built for no step


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


def test_the_session_takes_over_the_lease_of_a_dead_process_of_this_host(tmp_path):
    ctx, clock, seen = context(tmp_path, "train.steps=2")
    record = {"holder": f"local:{ctx.env.host}:pid999999:old", "token": "t", "since": "",
              "heartbeat_wall": clock.wall(), "timeout_s": 300}  # fmt: skip
    key = Path(tmp_path / "storage" / ctx.run / "lease.json")
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(record))
    with pytest.raises(LeaseHeld):  # the process still runs: a real second session
        wired(ctx, clock, tmp_path, is_running=lambda pid: True).run()
    assert read_lease(ctx.storage, ctx.run).holder == record["holder"]
    assert wired(ctx, clock, tmp_path, is_running=lambda pid: False).run() == EXIT_OK
    taken = [e.message for e in seen if isinstance(e, events.Warning) and e.kind == "lease"]
    assert taken == [f"taking over the lease of {record['holder']}: that process is gone"]


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
    assert wire(ctx).is_main and isinstance(wire(ctx).fenced, FencedStorage)  # rank 0 writes, fenced
    other = wire(replace(ctx, ranks=ranks))
    assert not other.is_main and other.fenced is ctx.storage  # a rank that never writes needs no fence


def test_an_upload_still_running_at_the_sessions_deadline_is_said(tmp_path):
    """The VM may go before a late upload commits: the user is told what that means, not left to guess."""

    def session_end(done_in_s: float, error: str | None = None, hours: float | None = 1.0):
        ctx, clock, seen = context(tmp_path / f"{done_in_s}-{error}-{hours}", "train.steps=2", hours=hours)
        ckpts = FakeCheckpoints(ctx.bus, done_in_s=done_in_s, error=error)
        session = wired(ctx, clock, tmp_path, ckpts=ckpts)
        try:
            code = session.run()
        except StorageError as exc:  # a failed upload: the caller's to report, as an error
            code = exc
        warnings = [e.message for e in seen if isinstance(e, events.Warning) and e.kind == "upload"]
        return code, ckpts.waits, warnings, 3600.0 - clock.monotonic()

    code, waits, warnings, left_s = session_end(done_in_s=4000.0)
    assert code == EXIT_OK and waits[0] == pytest.approx(left_s)  # it waits only as long as the session has left
    assert len(warnings) == 1 and "step 2 is still uploading" in warnings[0]
    assert "resumes from the checkpoint before it" in warnings[0]
    code, _, warnings, _ = session_end(done_in_s=10.0)
    assert code == EXIT_OK and not warnings
    code, _, warnings, _ = session_end(done_in_s=10.0, error="HTTP 500")  # a failure is the caller's to report
    assert isinstance(code, StorageError) and "could not be committed" in str(code) and not warnings
    code, waits, warnings, _ = session_end(done_in_s=4000.0, hours=None)  # no deadline: nothing to outlast
    assert code == EXIT_OK and not warnings and waits == [None]


# ---------------------------------------------------------------- a refused new run


class TakenRightAfterRelease:
    """The run's storage, where another trainer takes the run the moment this session's lease is removed."""

    def __init__(self, storage, run: str, clock: FakeClock) -> None:
        self._storage, self.run, self.clock, self.url = storage, run, clock, storage.url
        self.other: Lease | None = None

    def __getattr__(self, name: str):
        return getattr(self._storage, name)

    def delete(self, key: str) -> None:
        self._storage.delete(key)
        if key == f"{self.run}/lease.json" and self.other is None:
            self.other = Lease(self._storage, self.run, "kaggle:other:pid7:bob", clock=self.clock, settle_s=0)
            self.other.acquire()


def test_a_refused_new_run_is_removed_while_its_lease_is_held_never_after(tmp_path):
    """A typo leaves no run behind, but the files go before the lease does: once released, another trainer
    may own the run, and what it writes is not this session's to delete."""
    ctx, clock, seen = context(tmp_path, hours=0.05)  # refused: no step fits in 3 minutes
    ctx.storage = TakenRightAfterRelease(ctx.storage, ctx.run, clock)
    session = wire(ctx, training=FakeTraining(clock), caches=FakeCaches(tmp_path))  # the real finish
    with pytest.raises(UsageError):
        session.run()
    assert ctx.storage.other is not None  # the other trainer took the run after the release
    lease = read_lease(ctx.storage, ctx.run)
    assert lease is not None and lease.holder == "kaggle:other:pid7:bob"  # its lease is left alone
    assert sorted(ctx.storage.list(ctx.run)) == [f"{ctx.run}/lease.json"]  # run.json and the rest are gone
