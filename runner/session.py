"""The only orchestrator: one session of a run, from lease to exit code.

Owns: the lifecycle of one session — lease, restore, the step loop with its
checkpoint and stop decisions, the final checkpoint — and mapping how it ends
to an exit code (0 target reached, 75 run again, else an error). It builds
none of its parts: runner.wiring hands it the lease, the checkpoint manager,
the training side, the caches to set up (caches.py) and what the session
leaves when it ends (finish.py), so the tests hand it fakes. What a pure
function can decide (budget.py, fit.py) is decided there, not here. torch is
imported only by the parts, lazily: the tests of this lifecycle run without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from runner import budget, costs, events, quota
from runner.caches import SessionCaches
from runner.checkpoint.manager import CheckpointManager
from runner.clock import iso
from runner.context import Context
from runner.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    Interrupted,
    LeaseLapsed,
    StorageError,
    UsageError,
    end_reason_for,
    exit_code_for,
)
from runner.finish import SessionFinish
from runner.lease import Lease
from runner.leaserecord import holder_died_on, read_lease
from runner.report import session_history
from runner.runinfo import ensure_run_info, new_state, resolve_target, sets_target
from runner.signals import StopFlag, install_stop_handlers
from runner.state import RunState, read_run_info, read_sessions
from runner.storage import Storage

log = logging.getLogger(__name__)
BUDGET_EVENT_EVERY_S = 5.0  # how often the views hear the budget: a countdown in minutes needs no more
# tests only: seconds added to each step, so the fault tests' kills land inside a run whatever the machine's speed
TEST_STEP_DELAY_ENV = "RELAY_TEST_STEP_DELAY_S"


class Training(Protocol):
    """The training side as the session uses it (runner.wiring's TorchTraining; fakes in the tests)."""

    def place(self, ctx: Context):
        """This rank's placement (device, rank, world), its process group joined."""

    def agree(self, placement, *flags: bool) -> tuple[bool, ...]:
        """Rank 0's flags, on every rank."""

    def start(self, ctx: Context, cache_dir, placement, state: RunState):
        """A training run (model, data, the fit's plan) for `state`; it steps, snapshots and restores."""

    def close(self) -> None:
        """Leave the process group, if one was joined."""


@dataclass
class SessionParts:
    """What a session works with, built by runner.wiring.wire (or by a test, from fakes)."""

    lease: Lease
    fenced: Storage  # the run's storage behind the lease (rank 0); the plain storage on other ranks
    ckpts: CheckpointManager
    training: Training
    caches: SessionCaches  # the latent and compile caches, set up before the first step
    finish: SessionFinish  # the session's record, logs, loss curve, final/, GPU release
    is_running: Callable[[int], bool]  # whether a process of this machine runs (a dead holder's lease)


class Session:
    """One session of a run. `run()` returns the process exit code."""

    def __init__(self, ctx: Context, parts: SessionParts, *, stop: StopFlag | None = None) -> None:
        self.ctx = ctx
        self.stop = stop  # an experiment's sessions share one: a stop asked during one variant ends them all
        self._budget_sent_at: float | None = None  # monotonic time of the last BudgetUpdated
        self.is_main = ctx.ranks.is_main
        self.lease, self.fenced, self.ckpts = parts.lease, parts.fenced, parts.ckpts
        self.training, self.caches, self.finish = parts.training, parts.caches, parts.finish
        self.is_running = parts.is_running
        prior = costs.profile_step_prior(ctx.profile, ctx.env.gpu_summary, ctx.ranks.world)  # until one is measured
        self.meter = costs.CostMeter(step_prior_s=prior.step_s)
        self.started_wall = ctx.clock.wall()
        self.step_from = self.step = 0
        self.train_s = self.checkpoint_s = 0.0
        self.upload_started: float | None = None
        self.checkpointed_step: int | None = None  # the newest step staged in this session
        self.reason = "running"  # until the session knows how it ends
        self.refused_new_run = False  # a new run refused as bad input: its files go before the lease does
        self.test_step_delay_s = float(os.environ.get(TEST_STEP_DELAY_ENV) or 0)  # tests only (see above)
        ctx.bus.subscribe(self._on_event)

    def _on_event(self, event: events.Event) -> None:
        """Upload timing, measured on the upload worker's thread."""
        if isinstance(event, events.CheckpointCommitted):
            self.meter.add_upload(event.upload_s)
            self.upload_started = None
        elif isinstance(event, events.UploadFailed):
            self.upload_started = None

    def run(self) -> int:
        ctx, code = self.ctx, 1
        is_new = self.is_main and read_run_info(ctx.storage, ctx.run, missing_ok=True) is None
        with install_stop_handlers(self.stop) as stop:
            try:
                self._settle_target()
                if self.is_main:
                    self.lease.acquire(take_over=ctx.opts.take_over or self._holder_died_here())
                    self.lease.start_heartbeat()  # from now until release, whatever the session is doing
                try:
                    code = self._train(stop)
                except Interrupted:
                    self.reason = "signal"
                    raise
                except BaseException as exc:
                    self.reason = "error"
                    self.refused_new_run = is_new and exit_code_for(exc) == EXIT_USAGE
                    raise
                finally:
                    self._close()
            except Interrupted as exc:
                self.reason, code = "signal", exc.exit_code
                ctx.bus.emit(events.Warning(str(exc), kind="signal"))
            except BaseException as exc:
                self.reason, code = end_reason_for(exc), exit_code_for(exc)
                raise
            finally:
                ctx.bus.emit(events.SessionEnded(self.step, ctx.profile.train.steps, self.reason, code))
                if self.ctx.ranks.world > 1:  # one process never imports torch.distributed here
                    self.training.close()
        return code

    def _settle_target(self) -> None:
        """The run's target is the run's: run.json's, unless `--set train.steps=N` changes it on purpose.
        Every rank trains (and schedules its learning rate) for the same target."""
        ctx = self.ctx
        if self.is_main:
            stored = ensure_run_info(ctx, force=ctx.opts.force).target
        else:
            info = read_run_info(ctx.storage, ctx.run, missing_ok=True)
            stored = info.target if info else None
        target = resolve_target(stored, ctx.profile.train.steps, sets_target(ctx.opts.overrides))
        if target != ctx.profile.train.steps:
            ctx.profile = replace(ctx.profile, train=replace(ctx.profile.train, steps=target))

    def _holder_died_here(self) -> bool:
        """A lease left by a process of this machine that no longer runs (a crash, a kill) is taken at once;
        one from another machine must age past its timeout, or be taken with --take-over."""
        record = read_lease(self.ctx.storage, self.ctx.run)
        if record is None or not holder_died_on(record.holder, self.ctx.env.host, self.is_running):
            return False
        self.ctx.bus.emit(
            events.Warning(f"taking over the lease of {record.holder}: that process is gone", kind="lease")
        )
        return True

    def _close(self) -> None:
        self.ckpts.close()
        if not self.is_main:
            return
        if self.lease.is_lost:  # another session may be writing the run now: leave everything to it
            self.lease.release()
            return
        if self.refused_new_run:  # removed while the lease is ours: once released, the run may be another's
            self.finish.forget_run(keep=self.lease.key)
        else:
            self.finish.record_session(self.session_record())
            self.finish.upload_logs()
            self.finish.loss_curve()
        why = self.lease.release()
        if why:  # a finished run says why its lease stays (the store did not answer), never exits 1 for it
            self.ctx.bus.emit(events.Warning(why, kind="lease"))
        self.finish.flush()

    def session_record(self) -> dict:
        env, now = self.ctx.env, self.ctx.clock.wall()
        return {
            "id": self.ctx.session_id, "platform": env.platform, "tier": env.tier, "host": env.host,
            "gpu": env.gpu_summary, "gpu_count": len(env.gpus), "started": iso(self.started_wall),
            "start_wall": self.started_wall, "end_wall": now, "wall_s": round(now - self.started_wall, 1),
            "train_s": round(self.train_s, 1), "step_from": self.step_from, "step_to": self.step,
            "steps": self.step - self.step_from, "reason": self.reason,
            "limit_h": self.ctx.profile.session.hours or env.session_limit_h,
            "limit_source": "session.hours" if self.ctx.profile.session.hours else env.limit_source,
        }  # fmt: skip

    def _train(self, stop) -> int:
        ctx = self.ctx
        placement = self.training.place(ctx)
        restored = self.ckpts.latest(ctx.workdir / "restore" / f"rank{placement.rank}")  # ranks share the workdir
        state = restored.state if restored and restored.state else new_state(ctx)
        state = replace(state, target=ctx.profile.train.steps)  # the run's target, settled at the start
        if self.is_main:  # how earlier sessions really ended (a checkpoint records its own as "running")
            state = replace(state, sessions=session_history(ctx.storage, ctx.run, state.sessions))
        self.step_from = self.step = state.step
        if state.step >= ctx.profile.train.steps:
            self.reason = "completed"
            if self.is_main:
                self.finish.from_checkpoint(state, restored, placement.device)
            return EXIT_OK
        (has_time,) = self.training.agree(placement, self._has_time_to_train(state))  # rank 0's, on every rank
        if not has_time:
            self.reason = "budget"
            return EXIT_PREEMPTED
        cache_dir = self.caches.latent_cache(placement)
        self.caches.restore_compile_cache(placement)  # before the fit's probe step compiles anything
        tr = self.training.start(ctx, cache_dir, placement, state)
        if restored is not None:
            tr.restore(restored.dir, state.trainer)
        state = replace(state, plan=tr.plan.to_dict(), cache_fingerprint=self.caches.fingerprint())
        deadline = budget.session_deadline(ctx.env, ctx.profile, ctx.clock)
        ctx.bus.emit(events.SessionStarted(
            ctx.run, ctx.env.platform, ctx.env.gpu_summary, state.step, state.target,
            None if deadline is None else deadline - ctx.clock.monotonic(), tuple(state.sessions),
        ))  # fmt: skip
        self._warn_quota(state)
        return self._loop(tr, state, deadline, stop)

    def _loop(self, tr, state: RunState, deadline: float | None, stop) -> int:
        ctx = self.ctx
        target = ctx.profile.train.steps
        last_ckpt_at = ctx.clock.monotonic()
        while True:
            if stop.stop_now:
                raise Interrupted("stopped at once (second interrupt); the last committed checkpoint is intact")
            if self.is_main:
                self._check_lease(tr, state)  # another session took the run: stop before writing anything more
            bctx = self._budget(deadline, last_ckpt_at, target - state.step)
            self._send_budget(bctx)
            action = budget.next_action(bctx, has_new_steps=state.step != (self.checkpointed_step or self.step_from))
            stopping, due = self.training.agree(tr.placement, stop.requested or action is budget.Action.STOP,
                                  action is budget.Action.CHECKPOINT)  # fmt: skip
            if stopping:
                self.reason = "signal" if stop.requested else "budget"
                if self.reason == "budget" and self.step == self.step_from and self.is_main:
                    self._say_why_no_step(bctx, refuse=False)  # the setup took the time a step needed
                break
            if due:
                last_ckpt_at = ctx.clock.monotonic()  # the interval runs between captures
                self._checkpoint(tr, state)
                continue
            result = tr.step(state.step)
            step_s = result.seconds + self._test_step_delay()
            if state.step == self.step_from:
                self.caches.store_compile_cache(tr)
            self.train_s += step_s
            self.meter.add_step(step_s - result.setup_s)  # a new shape's compile/capture is setup
            state = replace(state, step=state.step + 1, plan=tr.plan.to_dict())  # a back-off is resumed from
            self.step = state.step
            ctx.bus.emit(tr.step_event(state.step, result))
            if self.is_main:
                self.ckpts.check()  # a checkpoint the worker could not write (a full disk) ends the session now
            every = ctx.profile.sample.every_steps
            if every and self.is_main and state.step % every == 0 and state.step < target:
                self._sample(tr, state.step)
        return self._end(tr, state, deadline)

    def _check_lease(self, tr, state: RunState) -> None:
        """Raise when this session may write no more. A lease that could not be renewed in time (LeaseLapsed)
        first keeps the steps since the last checkpoint on local disk (workdir/staging), uncommitted."""
        try:
            self.lease.check()
        except LeaseLapsed:
            if state.step != (self.checkpointed_step or self.step_from):
                staged = self.ckpts.stage(state.step, tr.save_state, state=state)
                self.ctx.bus.emit(events.Warning(f"lease not renewed in time: step {state.step} kept uncommitted "
                                                 f"in {staged.dir}", kind="lease"))  # fmt: skip
            raise

    def _test_step_delay(self) -> float:
        """Tests only (RELAY_TEST_STEP_DELAY_S): a slower step, counted as training time like a real one."""
        if self.test_step_delay_s:
            self.ctx.clock.sleep(self.test_step_delay_s)
        return self.test_step_delay_s

    def _has_time_to_train(self, state: RunState) -> bool:
        """Before any setup: whether one step and its checkpoint fit at the prior costs. A session whose whole
        length is too short is bad input (exit 2: no rerun can help); one with too little left says why."""
        deadline = budget.session_deadline(self.ctx.env, self.ctx.profile, self.ctx.clock)
        bctx = self._budget(deadline, self.ctx.clock.monotonic(), state.target - state.step)
        return self._say_why_no_step(bctx, refuse=True)

    def _say_why_no_step(self, bctx: budget.BudgetContext, *, refuse: bool) -> bool:
        """True when a step fits; else a warning says why (`refuse`: UsageError when no session this long can)."""
        hours = self.ctx.profile.session.hours or self.ctx.env.session_limit_h
        short = budget.too_short_to_train(bctx, session_s=hours * 3600.0 if hours else None)
        if short is None:
            return True
        if refuse and not short.rerun_helps:
            raise UsageError(short.message, hint="give the session more time (e.g. --hours 1) or a smaller "
                                                 "session.margin_min (--set session.margin_min=1)")  # fmt: skip
        self.ctx.bus.emit(events.Warning(short.message, kind="budget"))
        return False

    def _send_budget(self, bctx: budget.BudgetContext) -> None:
        """Tell every view the budget (time left, next checkpoint), at most every BUDGET_EVENT_EVERY_S."""
        now = self.ctx.clock.monotonic()
        if self._budget_sent_at is not None and now - self._budget_sent_at < BUDGET_EVENT_EVERY_S:
            return
        self._budget_sent_at = now
        self.ctx.bus.emit(events.BudgetUpdated(budget.time_left_s(bctx), budget.next_checkpoint_in_s(bctx)))

    def _budget(self, deadline, last_ckpt_at: float, steps_left: int) -> budget.BudgetContext:
        now = self.ctx.clock.monotonic()
        upload_left = 0.0
        started = self.upload_started  # read once: the upload worker sets it to None when the upload ends
        if started is not None:
            upload_left = budget.estimate_upload_left_s(now - started, self.meter.upload_s)
        return budget.context(
            self.ctx.profile, self.meter, now=now, deadline=deadline, last_checkpoint_at=last_ckpt_at,
            steps_left=steps_left, train_s=self.train_s, checkpoint_s=self.checkpoint_s, upload_left_s=upload_left,
        )  # fmt: skip

    def _end(self, tr, state: RunState, deadline: float | None = None) -> int:
        """The session's last checkpoint, committed before we say anything is safe; then final/ if done."""
        if state.step >= state.target:
            self.reason = "completed"  # recorded as such in the final checkpoint's session history
        if state.step > self.step_from and state.step != self.checkpointed_step:
            self._checkpoint(tr, state)
        if self.is_main:
            self._say_if_upload_outlasts(deadline, state.step)
        if self.is_main and not self.ckpts.wait():
            raise StorageError(
                f"the checkpoint of step {state.step} could not be committed ({self.ckpts.last_error}); "
                f"its local copy is kept in {self.ctx.workdir / 'staging'}",
                hint="check the storage (relay doctor --storage URL), then run the same command again",
            )
        if state.step < state.target:
            return EXIT_PREEMPTED
        self.reason = "completed"
        if self.is_main:
            sessions = [*self._prior_sessions(state), self.session_record()]
            self.finish.commit_final(tr.lora_weights(), state.step, sessions, tr.placement.device, unet=tr.unet)
            self.finish.release_gpu()
        return EXIT_OK

    def _say_if_upload_outlasts(self, deadline: float | None, step: int) -> None:
        """An upload still running when the session's time is up is said, with what it means: the VM may go
        before it commits (then the next session resumes from the checkpoint before it). Then it is waited for."""
        if deadline is None:
            return
        left_s = max(0.0, deadline - self.ctx.clock.monotonic())
        if self.ckpts.wait(timeout_s=left_s) or self.ckpts.last_error is not None:
            return  # committed in time, or failed (which the caller reports)
        self.ctx.bus.emit(events.Warning(
            f"the checkpoint of step {step} is still uploading at the end of the session's time; if the VM goes "
            f"first, the next session resumes from the checkpoint before it (its local copy is in "
            f"{self.ctx.workdir / 'staging'})", kind="upload"))  # fmt: skip

    def _checkpoint(self, tr, state: RunState) -> None:
        if not self.is_main:
            return  # rank 0 holds the same LoRA weights (gradients are all-reduced) and saves them
        state = replace(state, sessions=[*self._prior_sessions(state), self.session_record()])
        staged = self.ckpts.stage_snapshot(state.step, tr.snapshot_state, state=state)  # written by the worker
        self.checkpointed_step = state.step
        self.meter.add_checkpoint(staged.stage_s)
        self.checkpoint_s += staged.stage_s
        val = tr.validation_loss()
        if val is not None:
            self.ctx.bus.emit(events.Validated(state.step, val))
        self.upload_started = self.ctx.clock.monotonic()
        self.ckpts.submit(staged)

    def _sample(self, tr, step: int) -> None:
        """The base-vs-LoRA grid during training; one module at a time on the GPU, freed after. Best effort."""
        from runner.sample import draw_samples

        out = self.ctx.workdir / "samples" / f"step-{step:08d}.png"
        tr.trainer.release_graphs()  # their memory pool would crowd the pipeline; the next step captures again
        try:
            draw_samples(self.ctx.profile, None, out, device=tr.placement.device, unet=tr.unet,
                         text_encoders=tr.encoders, step=step)  # fmt: skip
            self.fenced.put(out, f"{self.ctx.run}/samples/step-{step:08d}/{out.name}")
        except (RuntimeError, OSError, StorageError) as exc:  # a lost preview must never cost training
            self.ctx.bus.emit(events.Warning(f"samples of step {step} not drawn: {exc}", kind="samples"))
            return
        self.ctx.bus.emit(events.SampleSaved(step, str(out)))

    def _prior_sessions(self, state: RunState) -> list[dict]:
        return [s for s in state.sessions if s.get("id") != self.ctx.session_id]

    def _warn_quota(self, state: RunState) -> None:
        if self.ctx.env.platform != "kaggle":
            return
        left = quota.kaggle_quota_left_h(read_sessions(self.ctx.storage, self.ctx.run), self.ctx.clock.wall(),
                                          account=self.ctx.env.host)  # fmt: skip
        message = quota.quota_warning(left, state.target - state.step, self.meter.step_s, len(self.ctx.env.gpus))
        if message:
            self.ctx.bus.emit(events.Warning(message, kind="quota"))
