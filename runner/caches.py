"""A session's setup before its first step: the latent cache and the compile cache, shared by its ranks.

Owns: `SessionCaches` — building (in committed pieces) or fetching the latent cache, restoring the kernels
an earlier session compiled on the same GPU model and torch, storing them after this session's first
compiled step, and running each such setup once on rank 0 while the other ranks wait for its mark in the
shared work folder (runner.handoff). Must not: decide when to train or stop (session.py), or import torch
at module level (runner.train is imported lazily, when a setup step runs).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner import events
from runner.checkpoint.store import (
    COMPILE_CACHE_FILE,
    FolderStore,
    ensure_latent_cache_in_pieces,
    fetch_compile_cache,
    store_compile_cache,
)
from runner.context import Context
from runner.errors import StorageError
from runner.handoff import Handoff, launch_id

log = logging.getLogger(__name__)
TEST_CACHE_DELAY_ENV = "RELAY_TEST_CACHE_DELAY_S"  # tests only: seconds of delay before each cache piece


class SessionCaches:
    """The latent and compile caches of one session; `store` is the run's (fenced) folder store."""

    def __init__(self, ctx: Context, store: FolderStore) -> None:
        self.ctx = ctx
        self.store = store
        self.is_main = ctx.ranks.is_main
        self.compile_key: str | None = None  # set when this session reuses or may store compiled kernels
        self.compile_cache_loaded = False

    def fingerprint(self) -> str:
        """The latent cache's fingerprint, recorded in the run's state."""
        from runner.train.cache import cache_fingerprint

        return cache_fingerprint(self.ctx.profile)

    def latent_cache(self, placement) -> Path:
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

    def _shared_setup(self, placement, what: str, work: Callable[[], Any]) -> str:
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

    def restore_compile_cache(self, placement) -> None:
        """Load the kernels an earlier session compiled on this GPU model and torch, when stored: the first
        step then skips most of torch.compile's work. Best effort: without them the step compiles."""
        ctx = self.ctx
        if not placement.device.startswith("cuda") or ctx.profile.train.compile == "off":
            return
        from runner.train.compiling import load_compile_artifacts
        from runner.train.run import compile_cache_key_of

        key = self.compile_key = compile_cache_key_of(placement)
        name = f"compile-cache/{key}"

        def fetch() -> str:  # the ranks share the work folder: rank 0 fetches for all, the others wait for its mark
            return "stored" if fetch_compile_cache(self.store, key, ctx.bus) is not None else "none"

        self._shared_setup(placement, "compile-cache", fetch)
        if not self.store.is_local(name):
            return
        try:
            load_compile_artifacts((self.store.local(name) / COMPILE_CACHE_FILE).read_bytes())
            self.compile_cache_loaded = True
        except Exception as exc:  # a cache from another build of torch must never stop training
            ctx.bus.emit(events.Warning(f"stored compile cache not used ({exc}); compiling", kind="compile"))

    def store_compile_cache(self, tr) -> None:
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
