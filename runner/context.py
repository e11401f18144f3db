"""A session's context: the options it was started with, and what is read once at its start.

Owns: `Options` (the parsed flags of a command that acts on a run), `Ranks` (this process's rank and the
world size: the launcher's variables, read once here, never again below), `Context` (profile, environment,
storage, run, work folder, event bus, clock, ranks) and `build_context`. The commands build a context; the
session and the parts it calls read it. Must not: act (train, write storage) or import torch.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner import events
from runner.clock import Clock, SystemClock
from runner.env import Env, detect_env
from runner.profile import Profile, load_profile
from runner.runinfo import run_identity
from runner.storage import Storage
from runner.storage.url import open_storage


@dataclass(frozen=True)
class Ranks:
    """This process among the processes of one launch (torchrun/accelerate's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False
    """Whether a launcher started this process as one rank of a launch (WORLD_SIZE is set)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Ranks:
        return cls(
            rank=int(environ.get("RANK", "0")), world=int(environ.get("WORLD_SIZE", "1")),
            local_rank=int(environ.get("LOCAL_RANK", "0")), launched="WORLD_SIZE" in environ,
        )  # fmt: skip

    @property
    def is_main(self) -> bool:
        """Rank 0 alone holds the lease, checkpoints, uploads and draws the dashboard."""
        return self.rank == 0


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
    experiment: str = ""
    """The experiment this run is a variant of ("": a run of its own); its variants share one latent cache."""
    ranks: Ranks = field(default_factory=Ranks)
    """This process's rank and the world size, read once by build_context."""

    @property
    def overrides(self) -> tuple[str, ...]:
        """The `--set` items the session was started with."""
        return self.opts.overrides

    @property
    def holder(self) -> str:
        return f"{self.env.platform}:{self.env.host}:pid{os.getpid()}:{self.session_id}"


def build_context(
    opts: Options, *, clock: Clock | None = None, env: Env | None = None, profile: Profile | None = None,
    run: str | None = None, experiment: str = "", ranks: Ranks | None = None,
    open_store: Callable[[str], Storage] = open_storage,
) -> Context:  # fmt: skip
    """`profile` and `run`: a variant of an experiment (default: the profile the options name, its run).
    `open_store`: how the storage URL is opened (tests: a stand-in's client with a fast retry policy)."""
    profile = profile or opts.load_profile()
    if profile.variants and run is None and opts.run:  # --run VARIANT (or EXP--VARIANT): that variant's settings
        match = next((v for v in profile.variants if opts.run in (v.variant, v.run_name)), None)
        if match is not None:
            profile, run, experiment = match, match.run_name, profile.run_name
    env = env or detect_env(workdir=opts.workdir)
    storage = open_store(opts.storage)
    run = run or run_identity(profile, opts.run)  # the one rule; profiles of one job (T4, Kaggle 2×T4) share a run
    workdir = Path(opts.workdir or env.workdir) / run
    workdir.mkdir(parents=True, exist_ok=True)
    ranks = ranks or Ranks.from_environ(os.environ)  # the launcher's variables, read once for the session
    return Context(opts, profile, env, storage, run, workdir, events.EventBus(), clock or SystemClock(),
                   experiment=experiment, ranks=ranks)  # fmt: skip
