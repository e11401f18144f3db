"""The only orchestrator: one session of a run, from lease to exit code.

Owns: the lifecycle of one session — lease, restore, cache, fit, the step
loop with its checkpoint and stop decisions, the final checkpoint and final/ —
and mapping how it ends to an exit code (0 target reached, 75 run again, else
an error). The parts below it know nothing of each other; only this module
calls them. What a pure function can decide (budget.py, fit.py) is decided
there, not here. Commands and the Context live in commands.py, the launcher of
several ranks in launch.py. torch is imported only through runner.train,
lazily, so `relay status` and the tests of this wiring start without it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from runner import budget, costs, events, quota
from runner.checkpoint.manager import CheckpointManager, Restored
from runner.checkpoint.store import (
    COMPILE_CACHE_FILE,
    FolderStore,
    ensure_latent_cache_in_pieces,
    fetch_compile_cache,
    store_compile_cache,
)
from runner.clock import iso
from runner.context import Context
from runner.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    Interrupted,
    LeaseLapsed,
    RelayError,
    StorageError,
    UsageError,
    end_reason_for,
    exit_code_for,
)
from runner.handoff import Handoff, launch_id
from runner.lease import Lease
from runner.leaserecord import holder_died_on, pid_is_running, read_lease
from runner.report import session_history
from runner.runinfo import ensure_run_info, new_state, resolve_target, sets_target
from runner.signals import StopFlag, install_stop_handlers
from runner.state import RunState, append_session, read_run_info, read_sessions
from runner.storage import WritesBackLate, capability
from runner.storage.fenced import FencedStorage
from runner.storage.url import is_vm_local

log = logging.getLogger(__name__)
BUDGET_EVENT_EVERY_S = 5.0  # how often the views hear the budget: a countdown in minutes needs no more
TEST_CACHE_DELAY_ENV = "RELAY_TEST_CACHE_DELAY_S"  # tests only: seconds of delay before each cache piece
# tests only: seconds added to each step, so the fault tests' kills land inside a run whatever the machine's speed
TEST_STEP_DELAY_ENV = "RELAY_TEST_STEP_DELAY_S"


def logs_dir(ctx: Context) -> Path:
    """This session's TensorBoard folder; each session writes its own files, uploaded when it ends."""
    return ctx.workdir / "logs" / ctx.session_id


class Session:
    """One session of a run. `run()` returns the process exit code."""

    def __init__(self, ctx: Context, *, stop: StopFlag | None = None) -> None:
        self.ctx = ctx
        self.stop = stop  # an experiment's sessions share one: a stop asked during one variant ends them all
        self._budget_sent_at: float | None = None  # monotonic time of the last BudgetUpdated
        self.is_main = ctx.ranks.is_main
        self.lease = Lease(ctx.storage, ctx.run, ctx.holder, clock=ctx.clock)
        # every write that matters asks the lease first: a session that lost the run writes nothing more
        self.fenced = FencedStorage(ctx.storage, self.lease.assert_held) if self.is_main else ctx.storage
        self.ckpts = CheckpointManager(
            self.fenced, ctx.run, ctx.workdir, keep=ctx.profile.checkpoint.keep, bus=ctx.bus, clock=ctx.clock
        )
        self.store = FolderStore(self.fenced, ctx.run, ctx.workdir)  # latent cache, compile cache, final/
        world = ctx.ranks.world
        prior = costs.profile_step_prior(ctx.profile, ctx.env.gpu_summary, world)  # until a step is measured
        self.meter = costs.CostMeter(step_prior_s=prior.step_s)
        self.started_wall = ctx.clock.wall()
        self.step_from = self.step = 0
        self.train_s = self.checkpoint_s = 0.0
        self.compile_key: str | None = None  # set when this session reuses or may store compiled kernels
        self.compile_cache_loaded = False
        self.upload_started: float | None = None
        self.checkpointed_step: int | None = None  # the newest step staged in this session
        self.reason = "running"  # until the session knows how it ends
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
                except BaseException:
                    self.reason = "error"
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
                if is_new and code == EXIT_USAGE:
                    self._forget_refused_run()
                ctx.bus.emit(events.SessionEnded(self.step, ctx.profile.train.steps, self.reason, code))
                self._leave_process_group()
        return code

    def _forget_refused_run(self) -> None:
        """A new run refused as bad input (its dataset, its plan) trained nothing: remove what this session
        wrote for it (run.json, sessions.jsonl, logs), so a typo leaves no run behind. Best effort."""
        try:
            for key in self.ctx.storage.list(self.ctx.run):
                self.ctx.storage.delete(key)
        except StorageError as exc:
            log.warning("could not remove the refused run's files: %s", exc)

    def _leave_process_group(self) -> None:
        if self.ctx.ranks.world > 1:  # one process never imports torch.distributed here
            from runner.train.run import close_distributed

            close_distributed()

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
        if record is None or not holder_died_on(record.holder, self.ctx.env.host, pid_is_running):
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
        try:
            append_session(self.ctx.storage, self.ctx.run, self.session_record())
        except StorageError as exc:
            log.warning("could not record the session in sessions.jsonl: %s", exc)
        self._upload_logs()
        self._loss_curve(self.ctx.workdir / "loss.png")
        why = self.lease.release()
        if why:  # a finished run says why its lease stays (the store did not answer), never exits 1 for it
            self.ctx.bus.emit(events.Warning(why, kind="lease"))
        late = capability(self.ctx.storage, WritesBackLate)
        if late is not None:  # the Colab mount: push what it holds before the VM can die
            late.flush()

    def _upload_logs(self) -> None:
        """TensorBoard files grow during a session, so they go up once, at its end, under the session's id."""
        folder = logs_dir(self.ctx)
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                key = f"{self.ctx.run}/logs/{self.ctx.session_id}/{path.relative_to(folder).as_posix()}"
                try:
                    self.ctx.storage.put(path, key)
                except StorageError as exc:
                    log.warning("log file %s not uploaded: %s", path.name, exc)

    def _loss_curve(self, out: Path) -> Path | None:
        """RUN/loss.png: train and validation loss over every session so far. Best effort."""
        from runner.losscurve import update_loss_curve

        try:
            # RUN/logs/ holds one folder per session: this session's is there already, the others are fetched
            return update_loss_curve(self.ctx.storage, self.ctx.run, logs_dir(self.ctx).parent, out)
        except (OSError, ValueError, StorageError) as exc:
            self.ctx.bus.emit(events.Warning(f"loss curve not drawn: {exc}", kind="logs"))
            return None

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
        from runner.train.run import Placement, TrainingRun, agree, init_distributed

        ctx = self.ctx
        ranks = ctx.ranks
        placement = Placement.detect(rank=ranks.rank, world=ranks.world, local_rank=ranks.local_rank)
        init_distributed(placement)
        restored = self.ckpts.latest(ctx.workdir / "restore" / f"rank{placement.rank}")  # ranks share the workdir
        state = restored.state if restored and restored.state else new_state(ctx)
        state = replace(state, target=ctx.profile.train.steps)  # the run's target, settled at the start
        if self.is_main:  # how earlier sessions really ended (a checkpoint records its own as "running")
            state = replace(state, sessions=session_history(ctx.storage, ctx.run, state.sessions))
        self.step_from = self.step = state.step
        if state.step >= ctx.profile.train.steps:
            self.reason = "completed"
            if self.is_main:
                self._finish_from_checkpoint(state, restored, placement.device)
            return EXIT_OK
        (has_time,) = agree(placement, self._has_time_to_train(state))  # rank 0's answer, on every rank
        if not has_time:
            self.reason = "budget"
            return EXIT_PREEMPTED
        cache_dir = self._cache(placement)
        self._restore_compile_cache(placement)  # before the fit's probe step compiles anything
        tr = TrainingRun(
            ctx.profile,
            cache_dir,
            placement=placement,
            bus=ctx.bus,
            stored_plan=state.plan or None,
            stored_gpu=_last_gpu(state),
            gpu_name=ctx.env.gpu_summary,
        )
        if restored is not None:
            tr.restore(restored.dir, state.trainer)
        from runner.train.cache import cache_fingerprint

        state = replace(state, plan=tr.plan.to_dict(), cache_fingerprint=cache_fingerprint(ctx.profile))
        deadline = budget.session_deadline(ctx.env, ctx.profile, ctx.clock)
        ctx.bus.emit(events.SessionStarted(
            ctx.run, ctx.env.platform, ctx.env.gpu_summary, state.step, state.target,
            None if deadline is None else deadline - ctx.clock.monotonic(), tuple(state.sessions),
        ))  # fmt: skip
        self._warn_quota(state)
        return self._loop(tr, state, deadline, stop)

    def _cache(self, placement) -> Path:
        """The latent cache, built (in committed pieces) or fetched by rank 0 while the others wait for it
        in the work folder, not in a collective (runner.handoff says why)."""
        return Path(self._shared_setup(placement, "latent-cache", lambda: str(self._build_cache(placement))))

    def _build_cache(self, placement) -> Path:
        from runner.train.cache import PieceBuilder, cache_fingerprint, merge_pieces, piece_ranges

        profile, bus = self.ctx.profile, self.ctx.bus
        ranges = piece_ranges(profile)
        builder = PieceBuilder(profile, total=ranges[-1][1] if ranges else 0, bus=bus, device=placement.device)
        delay_s = float(os.environ.get(TEST_CACHE_DELAY_ENV) or 0)

        def build_piece(start: int, stop: int, folder: Path) -> None:
            if delay_s:  # tests only: a cache build longer than the (shortened) collective timeout
                time.sleep(delay_s)
            builder(start, stop, folder)

        store, cache_fp = self.store, cache_fingerprint(profile)
        if self.ctx.experiment:  # the variants of an experiment share one cache: EXP/cache/FP
            from runner.experiment import shared_cache_profile

            workdir = self.ctx.workdir.parent / self.ctx.experiment
            store, cache_fp = (
                FolderStore(self.ctx.storage, self.ctx.experiment, workdir),
                cache_fingerprint(shared_cache_profile(profile)),
            )
        try:
            local, built = ensure_latent_cache_in_pieces(store, cache_fp, ranges, build_piece, merge_pieces, bus)
        finally:
            builder.close()
        if built:
            log.info("latent cache: built %d of %d pieces in this session", built, len(ranges))
        return local

    def _shared_setup(self, placement, what: str, work) -> str:
        """Rank 0 runs `work` (setup every rank needs) and marks it done in the shared work folder; the other
        ranks poll for the mark. No rank waits in a collective meanwhile: a collective times out (NCCL: 10
        minutes) long before a first latent cache is built on a T4."""
        if placement.world == 1:
            return work()
        handoff = Handoff(self.ctx.workdir, launch_id())
        if not self.is_main:
            return handoff.wait(what)
        result = work()
        handoff.mark(what, result)
        return result

    def _restore_compile_cache(self, placement) -> None:
        """Load the kernels an earlier session compiled on this GPU model and torch, when stored: the first
        step then skips most of torch.compile's work. Best effort: without them the step compiles."""
        ctx = self.ctx
        if not placement.device.startswith("cuda") or ctx.profile.train.compile == "off":
            return
        from runner.train.compiling import load_compile_artifacts
        from runner.train.run import compile_cache_key_of

        self.compile_key = compile_cache_key_of(placement)
        name = f"compile-cache/{self.compile_key}"

        def fetch() -> str:  # the ranks share the work folder: rank 0 fetches for all, the others wait for its mark
            return "stored" if fetch_compile_cache(self.store, self.compile_key, ctx.bus) is not None else "none"

        self._shared_setup(placement, "compile-cache", fetch)
        if not self.store.is_local(name):
            return
        try:
            load_compile_artifacts((self.store.local(name) / COMPILE_CACHE_FILE).read_bytes())
            self.compile_cache_loaded = True
        except Exception as exc:  # a cache from another build of torch must never stop training
            ctx.bus.emit(events.Warning(f"stored compile cache not used ({exc}); compiling", kind="compile"))

    def _store_compile_cache(self, tr) -> None:
        """After the first compiled step, store what it compiled for the sessions after this one."""
        if not (self.is_main and self.compile_key and tr.trainer.compiled) or self.compile_cache_loaded:
            return
        from runner.train.compiling import compile_artifacts

        try:
            blob = compile_artifacts()
            if blob:
                store_compile_cache(self.store, self.compile_key, blob)
        except (RuntimeError, OSError, StorageError) as exc:  # a cache is an optimisation: never cost training
            self.ctx.bus.emit(events.Warning(f"compile cache not stored ({exc})", kind="compile"))

    def _loop(self, tr, state: RunState, deadline: float | None, stop) -> int:
        from runner.train.run import agree

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
            stopping, due = agree(tr.placement, stop.requested or action is budget.Action.STOP,
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
                self._store_compile_cache(tr)
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
            self._commit_final(tr.lora_weights(), state.step, sessions, tr.placement.device, unet=tr.unet)
            self._release_gpu()
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

    def _finish_from_checkpoint(self, state: RunState, restored: Restored, device: str) -> None:
        """The target was reached earlier: make sure final/ exists (a kill may have come before it)."""
        if self.store.is_committed("final"):
            self.ctx.bus.emit(events.Notice(f"run already complete at step {state.step}; final/ is in storage"))
            return
        from runner.train.run import read_lora_file

        self._commit_final(read_lora_file(restored.dir), state.step, state.sessions, device)

    def _commit_final(self, lora_sd, steps: int, sessions: list[dict], device: str, unet=None) -> None:
        from runner.export import commit_final

        curve = self._loss_curve(self.ctx.workdir / "loss.png")  # final/ carries it too
        commit_final(self.store, self.ctx.profile, lora_sd, steps=steps, sessions=sessions, device=device, unet=unet,
                     bus=self.ctx.bus, loss_curve=curve)  # fmt: skip
        from runner.publish import publish_at_completion

        try:
            publish_at_completion(self.ctx.storage, self.ctx.run, self.ctx.profile.publish)
        except RelayError as exc:  # final/ is committed; publishing can be retried by hand
            self.ctx.bus.emit(events.Warning(f"publishing final/ failed: {exc}; run relay publish to retry",
                                             kind="upload"))  # fmt: skip

    def _release_gpu(self) -> None:
        if self.ctx.profile.session.release_gpu and self.ctx.env.platform == "colab":
            if is_vm_local(self.ctx.opts.storage):  # the only copy of final/ would go with the VM
                self.ctx.bus.emit(events.Warning("release_gpu ignored: the run's storage is on this VM's disk; "
                                                 "download final/ first", kind="storage"))  # fmt: skip
                return
            late = capability(self.ctx.storage, WritesBackLate)
            if late is not None:
                late.flush()
            from google.colab import runtime  # only on Colab

            try:
                runtime.unassign()  # POSTs the release, then needs the notebook kernel (colabtools runtime.py)
            except AttributeError:  # a `!` child: the VM is already released; the notebook cell does this itself
                log.info("runtime.unassign() outside the notebook kernel: use the notebook cell's release_gpu")

    def _warn_quota(self, state: RunState) -> None:
        if self.ctx.env.platform != "kaggle":
            return
        left = quota.kaggle_quota_left_h(read_sessions(self.ctx.storage, self.ctx.run), self.ctx.clock.wall(),
                                          account=self.ctx.env.host)  # fmt: skip
        message = quota.quota_warning(left, state.target - state.step, self.meter.step_s, len(self.ctx.env.gpus))
        if message:
            self.ctx.bus.emit(events.Warning(message, kind="quota"))


def _last_gpu(state: RunState) -> str | None:
    return state.sessions[-1].get("gpu") if state.sessions else None
