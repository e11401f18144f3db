"""The run's identity across sessions: its name, run.json's settings check, and the run's target.

Owns: the one rule that names a run (`run_identity`: `--run`, else the profile's `run` key, else
its name), which the trainer, the detached supervisor, the notebook cell, the chain and `relay
attach`/`stop` all ask; writing run.json for a new run; refusing, for an existing one, settings
that change the weights (unless --force); the run's target (the stored one wins
unless `--set train.steps=N` changes it on purpose, which is announced and
stored); the RunState of a run's first session. Must not: train, or touch
checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from runner import events
from runner.clock import Clock, iso
from runner.errors import ResumeMismatch
from runner.profile import Profile, diff_fields, fingerprint, fingerprint_fields, load_profile
from runner.state import RunInfo, RunState, read_run_info, write_run_info
from runner.storage import Storage


class RunScope(Protocol):
    """What these rules read of a session's context (runner.context.Context is one; it imports this module,
    so the context is described here rather than imported)."""

    storage: Storage
    run: str
    profile: Profile
    clock: Clock
    bus: events.EventBus

    @property
    def overrides(self) -> Sequence[str]:
        """The `--set` items the session was started with."""
        ...


def run_identity(profile: Profile, run: str | None = None) -> str:
    """The run a session of `profile` trains: `run` (the --run option) when given, else the profile's
    `run` key, else its name. Profiles of one job (sdxl-naruto-t4, sdxl-naruto-kaggle-2xt4) share a run
    through their `run` key, so a profile's name alone never names its run."""
    return run or profile.run_name


def identify_run(profile: str, run: str | None = None, overrides: Sequence[str] = ()) -> str:
    """`run_identity` of a profile given by name or path (with its --set items); a bad profile raises the
    same ProfileError the trainer would."""
    return run or run_identity(load_profile(profile, list(overrides)))


def new_state(ctx: RunScope) -> RunState:
    return RunState(
        run=ctx.run, step=0, target=ctx.profile.train.steps, profile_fingerprint=fingerprint(ctx.profile),
        profile_fields=fingerprint_fields(ctx.profile), created=iso(ctx.clock.wall()),
    )  # fmt: skip


def sets_target(overrides) -> bool:
    """Whether the user changes the target on purpose (`--set train.steps=N`)."""
    return any(o.split("=", 1)[0].strip() == "train.steps" for o in overrides)


def resolve_target(stored: int | None, asked: int, explicit: bool) -> int:
    """The run's target: the stored one, unless the user set another on purpose (`explicit`)."""
    return asked if stored is None or explicit else stored


def ensure_run_info(ctx: RunScope, *, force: bool) -> RunInfo:
    """Write run.json for a new run; for an existing one, refuse settings that change the weights."""
    info = read_run_info(ctx.storage, ctx.run, missing_ok=True)
    fields_now = fingerprint_fields(ctx.profile)
    if info is None:
        info = RunInfo(
            run=ctx.run, profile=ctx.profile.to_dict(), fingerprint=fingerprint(ctx.profile),
            fingerprint_fields=fields_now, target=ctx.profile.train.steps, created=iso(ctx.clock.wall()),
        )  # fmt: skip
        write_run_info(ctx.storage, info)
        return info
    differing = diff_fields(info.fingerprint_fields, fields_now)
    differing.pop("train.steps", None)  # a new target continues the same run (announced below)
    if differing and not force:
        raise ResumeMismatch(differing)
    if differing:
        ctx.bus.emit(events.Warning(f"--force: resuming with changed settings: {', '.join(sorted(differing))}"))
    asked = ctx.profile.train.steps
    if sets_target(ctx.overrides) and asked != info.target:
        ctx.bus.emit(events.Warning(f"target changed from {info.target} to {asked} steps", kind="target"))
        info = replace(info, target=asked)
        write_run_info(ctx.storage, info)
    return info
