"""The commands that act on a run: train, plan, sample, export.

Owns: turning parsed flags into `Options`, building the `Context` a session
works with (profile, environment, storage, work folder, event bus, clock), and
each command's few lines: `train` starts one process per GPU or runs a wired
Session under the dashboard, `plan` prints the dry run, `sample` and `export`
work from the newest committed checkpoint. Must not: hold the lifecycle of a
session (session.py) or decide anything a pure function can (budget, fit).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from runner.checkpoint.manager import CheckpointManager, Restored
from runner.context import Context, Options, Ranks, build_context
from runner.env import Env, detect_env
from runner.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, RelayError, UsageError, exit_code_for
from runner.profile import Profile
from runner.signals import StopFlag, install_stop_handlers
from runner.storage.url import check_vm_storage, open_storage

log = logging.getLogger(__name__)
Contexts = Callable[..., Context]  # build_context, or a test's (a wrapped storage, a listener on the bus)


def train(args, *, contexts: Contexts = build_context) -> int:
    """`relay train`: one run, or each unfinished variant of an experiment in turn while the session lasts.
    `contexts` builds each session's context (tests pass their own, built on build_context)."""
    opts = Options.from_args(args)
    profile = opts.load_profile()  # an experiment's variants are all validated here, before any model loads
    env = detect_env(workdir=opts.workdir)
    vm_warning = check_vm_storage(opts.storage, env.platform, os.environ)  # refused before a folder is made
    if vm_warning:
        log.warning(vm_warning)
    processes = int(os.environ.get("RELAY_PROCESSES", "0")) or len(env.gpus)  # one per GPU by default
    ranks = Ranks.from_environ(os.environ)  # read once: every part below asks the context
    if processes > 1 and not ranks.launched:
        from runner.fit import split_effective_batch

        for each in profile.variants or (profile,):  # before any rank
            split_effective_batch(each.train.batch_size * each.train.grad_accum, processes)
        from runner.launch import launch_distributed

        return launch_distributed(processes)  # every rank runs this command again (the whole experiment)
    if profile.variants:
        return train_experiment(opts, profile, env, ranks, contexts)
    return train_session(contexts(opts, profile=profile, env=env, ranks=ranks))


def train_session(ctx: Context, stop: StopFlag | None = None) -> int:
    from runner.finish import logs_dir
    from runner.wiring import wire

    if not ctx.ranks.is_main:
        return wire(ctx, stop=stop).run()  # other ranks train in lockstep and show nothing
    from runner.dashboard import Dashboard
    from runner.tblog import TensorBoardLogger

    with Dashboard.for_terminal(ctx.clock, plain=ctx.opts.plain, profile=ctx.profile) as dash:
        ctx.bus.subscribe(dash.on_event)
        TensorBoardLogger(logs_dir(ctx), run=ctx.run, config=ctx.profile.to_dict()).attach(ctx.bus)
        return wire(ctx, stop=stop).run()


def train_experiment(
    opts: Options, profile: Profile, env: Env, ranks: Ranks, contexts: Contexts = build_context
) -> int:
    """Train the next unfinished variant, then the next while the session lasts (they share its deadline).
    0 when every variant is complete; 75 when the session ended first; a variant that fails with bad input
    is recorded in EXP/experiment.json and skipped (exit 2 at the end when nothing else is left)."""
    from runner import experiment as exp

    storage = open_storage(opts.storage)
    name = opts.run or profile.run_name
    runs = dict(exp.variant_runs(profile, opts.run))
    by_name = {v.variant: v for v in profile.variants}
    is_main = ranks.is_main
    record = exp.open_record(storage, name, list(runs.items())) if is_main else exp.ExperimentRecord(name)
    complete = {v for v, run in runs.items() if exp.is_complete(storage, run)}
    tried: set[str] = set()
    with install_stop_handlers() as stop:  # one flag for every variant's session: a stop ends the command
        while (variant := exp.next_variant(list(runs), complete, set(record.failed), tried)) is not None:
            if stop.requested:
                return EXIT_PREEMPTED  # asked to stop between two variants
            tried.add(variant)
            ctx = contexts(opts, profile=by_name[variant], run=runs[variant], env=env, experiment=name,
                           ranks=ranks)  # fmt: skip
            try:
                code = train_session(ctx, stop)
            except RelayError as exc:
                if exit_code_for(exc) != EXIT_USAGE:
                    raise  # not the variant's settings: the next session tries again
                if is_main:
                    record = exp.record_failure(storage, record, variant, str(exc))
                print(f"relay: variant {variant!r} failed: {exc}\n  → recorded; going on with the next variant",
                      file=sys.stderr)  # fmt: skip
                continue
            if code != EXIT_OK:
                return code  # the session is over (75) or failed: the next one continues this variant
            complete.add(variant)
            if is_main:
                record = exp.clear_failure(storage, record, variant)
    left = set(runs) - complete
    if left - set(record.failed) and stop.requested:
        return EXIT_PREEMPTED
    if left:
        raise UsageError(f"experiment {name!r}: every variant is complete but {', '.join(sorted(left))}, which "
                         f"failed (errors in {storage.url}/{name}/{exp.EXPERIMENT_FILE})",
                         hint="fix the variant's settings or data, then run the same command again")  # fmt: skip
    return EXIT_OK


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


def compare(args) -> int:
    """`relay compare`: loss plot, table and (with a model at hand) image grid of an experiment's variants."""
    from runner.compare import compare as write_comparison
    from runner.compare import model_grid

    storage = open_storage(args.storage)
    grid = None if args.no_grid else model_grid(storage)
    files = write_comparison(storage, experiment=args.experiment, runs=args.runs,
                             out_dir=Path(args.out) if args.out else None, grid=grid)  # fmt: skip
    if "table.md" in files:
        print(files["table.md"].read_text())
    for name, path in files.items():
        print(f"{name}: {path}")
    if "grid.png" not in files and not args.no_grid:
        print("no image grid here: it needs a GPU (or every run on the tiny model)")
    return EXIT_OK


def newest_checkpoint(ctx: Context) -> Restored:
    restored = CheckpointManager(ctx.storage, ctx.run, ctx.workdir, keep=1, bus=ctx.bus).latest(
        ctx.workdir / "restore" / "export"
    )
    if restored is None and ctx.profile.variants:  # the experiment's base: no run of its own
        names = ", ".join(v.variant for v in ctx.profile.variants)
        raise UsageError(f"{ctx.profile.name} is an experiment: say which variant (--run VARIANT)",
                         hint=f"its variants: {names}")  # fmt: skip
    if restored is None:
        raise UsageError(f"no committed checkpoint of run {ctx.run!r} in {ctx.storage.url}",
                         hint="train first: relay train --profile NAME --storage URL")  # fmt: skip
    return restored
