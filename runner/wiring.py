"""The one place that builds a session's parts and hands them to it.

Owns: `wire(ctx)` — the run's lease, the storage fenced by it (rank 0 only), the checkpoint manager and
folder store on that storage, the caches to set up, what the session leaves when it ends, and the training
side (`TorchTraining`: placement, process group, the training run, torch imported on first use). Tests pass
fakes of any part through the same call. Must not: act (acquire, train, write) or decide anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runner.caches import SessionCaches
from runner.checkpoint.manager import CheckpointManager
from runner.checkpoint.store import FolderStore
from runner.context import Context
from runner.finish import SessionFinish
from runner.lease import Lease
from runner.leaserecord import pid_is_running
from runner.session import Session, SessionParts, Training
from runner.signals import StopFlag
from runner.state import RunState
from runner.storage.fenced import FencedStorage


class TorchTraining:
    """The training side of runner.train: this rank's placement and process group, and the training run."""

    def place(self, ctx: Context):
        from runner.train.run import Placement, init_distributed

        ranks = ctx.ranks
        placement = Placement.detect(rank=ranks.rank, world=ranks.world, local_rank=ranks.local_rank)
        init_distributed(placement)
        return placement

    def agree(self, placement, *flags: bool) -> tuple[bool, ...]:
        from runner.train.run import agree

        return agree(placement, *flags)

    def start(self, ctx: Context, cache_dir: Path, placement, state: RunState):
        from runner.train.run import TrainingRun

        return TrainingRun(
            ctx.profile,
            cache_dir,
            placement=placement,
            bus=ctx.bus,
            stored_plan=state.plan or None,
            stored_gpu=state.sessions[-1].get("gpu") if state.sessions else None,  # the fit's plan was for it
            gpu_name=ctx.env.gpu_summary,
        )

    def close(self) -> None:
        from runner.train.run import close_distributed

        close_distributed()


def wire(
    ctx: Context, *, stop: StopFlag | None = None, training: Training | None = None,
    caches: SessionCaches | None = None, finish: SessionFinish | None = None,
    ckpts: CheckpointManager | None = None, is_running: Callable[[int], bool] = pid_is_running,
) -> Session:  # fmt: skip
    """A session of `ctx` with its parts; any part given replaces the one built here (tests: fakes)."""
    lease = Lease(ctx.storage, ctx.run, ctx.holder, clock=ctx.clock)
    # every write that matters asks the lease first: a session that lost the run writes nothing more
    fenced = FencedStorage(ctx.storage, lease.assert_held) if ctx.ranks.is_main else ctx.storage
    store = FolderStore(fenced, ctx.run, ctx.workdir)  # latent cache, compile cache, final/
    parts = SessionParts(
        lease=lease,
        fenced=fenced,
        ckpts=ckpts
        or CheckpointManager(
            fenced, ctx.run, ctx.workdir, keep=ctx.profile.checkpoint.keep, bus=ctx.bus, clock=ctx.clock
        ),  # fmt: skip
        training=training or TorchTraining(),
        caches=caches or SessionCaches(ctx, store),
        finish=finish or SessionFinish(ctx, fenced, store),
        is_running=is_running,
    )
    return Session(ctx, parts, stop=stop)
