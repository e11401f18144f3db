"""The commands that act on a run: train, plan, sample, export.

Owns: turning parsed flags into `Options`, building the `Context` a session
works with (profile, environment, storage, work folder, event bus, clock), and
each command's few lines of wiring: `train` starts one process per GPU or runs
a Session under the dashboard, `plan` prints the dry run, `sample` and `export`
work from the newest committed checkpoint. Must not: hold the lifecycle of a
session (session.py) or decide anything a pure function can (budget, fit).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runner import events
from runner.checkpoint.manager import CheckpointManager, Restored
from runner.clock import Clock, SystemClock
from runner.env import Env, detect_env
from runner.errors import EXIT_OK, UsageError
from runner.profile import Profile, load_profile
from runner.runinfo import run_identity
from runner.storage import Storage
from runner.storage.url import check_vm_storage, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    profile: str
    storage: str
    run: str | None = None
    overrides: tuple[str, ...] = ()
    hours: float | None = None
    take_over: bool = False
    force: bool = False
    release_gpu: bool = False
    plain: bool = False
    workdir: str | None = None

    @classmethod
    def from_args(cls, args) -> Options:
        return cls(
            profile=args.profile, storage=args.storage, run=args.run, overrides=tuple(args.overrides),
            hours=getattr(args, "hours", None), take_over=getattr(args, "take_over", False),
            force=getattr(args, "force", False), release_gpu=getattr(args, "release_gpu", False),
            plain=getattr(args, "plain", False), workdir=args.workdir,
        )  # fmt: skip

    def load_profile(self) -> Profile:
        overrides, flags = list(self.overrides), {}
        if self.hours is not None:
            overrides.append(f"session.hours={self.hours}")
            flags["session.hours"] = f"--hours {self.hours:g}"  # errors name the flag, not the profile file
        if self.release_gpu:
            overrides.append("session.release_gpu=true")
            flags["session.release_gpu"] = "--release-gpu"
        return load_profile(self.profile, overrides, flags=flags)


@dataclass
class Context:
    """What a session works with, built once at its start."""

    opts: Options
    profile: Profile
    env: Env
    storage: Storage
    run: str
    workdir: Path
    bus: events.EventBus
    clock: Clock
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def holder(self) -> str:
        return f"{self.env.platform}:{self.env.host}:pid{os.getpid()}:{self.session_id}"


def build_context(opts: Options, *, clock: Clock | None = None, env: Env | None = None) -> Context:
    profile = opts.load_profile()
    env = env or detect_env(workdir=opts.workdir)
    storage = open_storage(opts.storage)
    run = run_identity(profile, opts.run)  # the one rule; profiles of one job (T4, Kaggle 2×T4) share a run
    workdir = Path(opts.workdir or env.workdir) / run
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(opts, profile, env, storage, run, workdir, events.EventBus(), clock or SystemClock())


def train(args) -> int:
    from runner.session import Session, logs_dir

    opts = Options.from_args(args)
    env = detect_env(workdir=opts.workdir)
    vm_warning = check_vm_storage(opts.storage, env.platform, os.environ)  # refused before a folder is made
    if vm_warning:
        log.warning(vm_warning)
    ctx = build_context(opts, env=env)
    processes = int(os.environ.get("RELAY_PROCESSES", "0")) or len(ctx.env.gpus)  # one per GPU by default
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        from runner.fit import split_effective_batch

        split_effective_batch(ctx.profile.train.batch_size * ctx.profile.train.grad_accum, processes)  # before any rank
        from runner.launch import launch_distributed

        return launch_distributed(processes)
    if int(os.environ.get("RANK", "0")) != 0:
        return Session(ctx).run()  # other ranks train in lockstep and show nothing
    from runner.dashboard import Dashboard
    from runner.tblog import TensorBoardLogger

    with Dashboard.for_terminal(ctx.clock, plain=opts.plain, profile=ctx.profile) as dash:
        ctx.bus.subscribe(dash.on_event)
        TensorBoardLogger(logs_dir(ctx), run=ctx.run, config=ctx.profile.to_dict()).attach(ctx.bus)
        return Session(ctx).run()


def plan(args) -> int:
    from runner.planning import print_plan

    return print_plan(build_context(Options.from_args(args)), probe=args.probe)


def sample(args) -> int:
    """`relay sample`: the base-vs-LoRA grid from the newest committed checkpoint."""
    from runner.sample import draw_samples, ensure_writable
    from runner.train.run import Placement, read_lora_file

    ctx = build_context(Options.from_args(args))
    if args.out:
        ensure_writable(Path(args.out))  # a bad --out fails before any model loads
    restored = newest_checkpoint(ctx)
    out = Path(args.out) if args.out else ctx.workdir / "samples" / f"step-{restored.step:08d}.png"
    draw_samples(ctx.profile, read_lora_file(restored.dir), out, device=Placement.detect().device, step=restored.step)
    ctx.storage.put(out, f"{ctx.run}/samples/step-{restored.step:08d}/{out.name}")
    print(f"sample grid of step {restored.step}: {out} (also in {ctx.storage.url}/{ctx.run}/samples/)")
    return EXIT_OK


def export(args) -> int:
    """`relay export`: final/ (diffusers and kohya files, model card, samples) from the newest checkpoint."""
    from runner.checkpoint.store import FolderStore
    from runner.export import commit_final
    from runner.runinfo import new_state
    from runner.train.run import Placement, read_lora_file

    ctx = build_context(Options.from_args(args))
    restored = newest_checkpoint(ctx)
    state = restored.state or new_state(ctx)
    store = FolderStore(ctx.storage, ctx.run, ctx.workdir)
    commit_final(store, ctx.profile, read_lora_file(restored.dir), steps=state.step, sessions=state.sessions,
                 device=Placement.detect().device, bus=ctx.bus)  # fmt: skip
    print(f"exported step {restored.step} to {ctx.storage.url}/{ctx.run}/final/")
    return EXIT_OK


def newest_checkpoint(ctx: Context) -> Restored:
    restored = CheckpointManager(ctx.storage, ctx.run, ctx.workdir, keep=1, bus=ctx.bus).latest(
        ctx.workdir / "restore" / "export"
    )
    if restored is None:
        raise UsageError(f"no committed checkpoint of run {ctx.run!r} in {ctx.storage.url}",
                         hint="train first: relay train --profile NAME --storage URL")  # fmt: skip
    return restored
