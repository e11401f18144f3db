"""`relay plan`: a dry run of the next session.

Owns: what `relay plan` prints — the platform and GPU, the memory plan (the
candidates the fit will try, or with --probe the one it picks on this GPU),
how many steps this session will train (the budget simulated over the
session's time left, at the step time earlier sessions measured), and the
sessions and hours the run still needs. Trains nothing and commits nothing.
"""

from __future__ import annotations

from rich.console import Console

from runner import budget, budgetsim, costs, humanize
from runner.fit import candidate_plans
from runner.report import read_status
from runner.runinfo import resolve_target, sets_target
from runner.state import read_run_info

ESTIMATE_GPUS = ("T4", "H200")  # the GPUs with published step times (runner.costs.STEP_S_PER_1024_EXAMPLE)


def print_plan(ctx, *, probe: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    p, env = ctx.profile, ctx.env
    console.print(f"[bold]{ctx.run}[/] ({p.name}): {p.description}")
    if p.variants:
        print_experiment(ctx, console)
        return 0
    if p.lora.text_encoder:
        console.print(f"trains: UNet LoRA at lr {p.train.lr:g}; both text encoders' LoRA at lr {p.lora.text_encoder_lr:g} "
                      "(text embeddings computed each step, not cached)")  # fmt: skip
    else:
        console.print(f"trains: UNet LoRA at lr {p.train.lr:g}; text encoders frozen (embeddings cached)")
    console.print(f"platform: {env.platform} ({env.tier}); GPU: {env.gpu_summary}; "
                  f"RAM {env.ram_gib:.1f} GiB; disk {env.disk_free_gib:.1f} GiB free")  # fmt: skip
    if p.model.base != "tiny":
        from runner.train.lora import count_lora_params

        console.print(optimizer_line(p, count_lora_params(p.lora)))
    t = p.train
    plans = candidate_plans(t.batch_size, t.grad_accum, t.gradient_checkpointing, world_size=max(1, len(env.gpus)))
    if probe:
        console.print(f"memory plan (probed on this GPU): {probe_plan(ctx).describe()}")
    else:
        console.print("memory plan: the fit tries, fastest first, until one fits: "
                      + "; ".join(c.describe() for c in plans))  # fmt: skip
    step, rate, stored_target = _progress(ctx)
    target = resolve_target(stored_target, t.steps, sets_target(ctx.opts.overrides))  # as the session settles it
    left = max(0, target - step)
    console.print(f"progress: step {step} / {target}; {left} steps to go")
    deadline = budget.session_deadline(env, p, ctx.clock)
    hours_left = None if deadline is None else max(0.0, (deadline - ctx.clock.monotonic()) / 3600)
    limit = (
        ""
        if p.session.hours or not env.session_limit_h
        else f" (limit {env.session_limit_h:.1f} h: {env.limit_source})"
    )
    console.print(
        f"this session: {'no time limit' if hours_left is None else humanize.hours(hours_left) + ' left'}{limit}"
    )
    for note in env.notes:
        console.print(f"  note: {note}")
    if rate is None and not env.gpus:  # no GPU here, nothing measured: what published figures predict
        for name in ESTIMATE_GPUS:
            prior = costs.profile_step_prior(p, name, 1)
            console.print(f"estimate on one {name}: about {prior.step_s:.2f} s/step, {humanize.duration(left * prior.step_s)} "
                          f"of training for the {left} steps to go ({prior.source})")  # fmt: skip
        console.print("  (estimates: the first session measures the real step time)")
        return 0
    if rate is None:  # nothing measured yet: the published figure for this GPU class
        prior = costs.profile_step_prior(p, env.gpus[0].name, len(env.gpus))
        step_s = prior.step_s
        console.print(f"step time: about {step_s:.2f} s/step on {env.gpu_summary}, an estimate "
                      f"({prior.source}); the first session measures the real one")  # fmt: skip
    else:
        step_s = 3600 / rate
    if hours_left is not None:
        sim = budgetsim.simulate_session(
            hours=hours_left, steps_left=left, step_s=step_s,
            checkpoint_s=costs.PRIOR_CHECKPOINT_S, upload_s=costs.PRIOR_UPLOAD_S,
            every_min=p.checkpoint.every_min, max_overhead_pct=p.checkpoint.max_overhead_pct,
            margin_s=p.session.margin_min * 60,
        )  # fmt: skip
        console.print(f"steps this session: about {sim.steps} ({sim.training_fraction:.0%} of the session training)")
    session_h = p.session.hours or env.session_limit_h
    total_h = left * step_s / 3600
    sessions = (
        "" if not session_h else ", " + humanize.sessions_needed({session_h: humanize.sessions_for(total_h, session_h)})
    )
    console.print(f"still needed: {humanize.hours(total_h)} of training at {step_s:.2f} s/step{sessions}")
    return 0


# fp32 values an optimizer keeps per trainable parameter, besides the parameter and its gradient: AdamW two
# moments; 8-bit AdamW the same in one byte each; Prodigy (prodigyopt) two moments, s and p0 (its step-size
# estimate's running sums; slice_p = 1 keeps them whole).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}


def optimizer_line(profile, lora_params: int) -> str:
    """The optimizer's state in memory for `lora_params` trainable parameters. Pure."""
    name = profile.train.optimizer
    per = OPTIMIZER_STATE_BYTES[name]
    mib = lora_params * per / 2**20
    line = f"optimizer: {name}, state {mib:.0f} MiB ({per} bytes × {lora_params / 1e6:.1f} M UNet LoRA parameters)"
    if name != "adamw":
        line += f"; AdamW would keep {lora_params * OPTIMIZER_STATE_BYTES['adamw'] / 2**20:.0f} MiB"
    return line


# A step with LoRA on both text encoders, against the UNet-only step (T4 emulation, 1024 px: 0.611 against
# 0.574 s, bench/RESULTS.md "Single-shape rows and text-encoder LoRA").
TEXT_ENCODER_STEP_FACTOR = 0.611 / 0.574


def print_experiment(ctx, console: Console) -> None:
    """Each variant's progress and estimated T4 hours, and the whole set's."""
    from runner.experiment import variant_runs

    p = ctx.profile
    total_h = 0.0
    console.print(f"experiment: {len(p.variants)} variants, trained one after another (each a run of its own)")
    for (name, run), v in zip(variant_runs(p, ctx.opts.run), p.variants, strict=True):
        step = read_status(ctx.storage, run).step if read_run_info(ctx.storage, run, missing_ok=True) else 0
        left = max(0, v.train.steps - step)
        hours = left * costs.profile_step_prior(v, "T4", 1).step_s / 3600
        note = ""
        if v.lora.text_encoder:  # the encoders run forward and backward at every step
            hours *= TEXT_ENCODER_STEP_FACTOR
            note = f" (text encoders: +{TEXT_ENCODER_STEP_FACTOR - 1:.1%})"
        total_h += hours
        console.print(f"  {name}: step {step} / {v.train.steps}; about {humanize.hours(hours)} on one T4{note} → {run}")
    sessions = humanize.sessions_needed({h: humanize.sessions_for(total_h, h) for h in (3.0, 12.0)})
    console.print(f"whole set: about {humanize.hours(total_h)} on one T4 ({sessions}); estimates from the "
                  "attention-only step time measured on a T4, the first session of each variant measures its own")  # fmt: skip


def _progress(ctx) -> tuple[int, float | None, int | None]:
    """(committed step, measured steps per hour, the stored target) from storage; (0, None, None) for a new run."""
    if read_run_info(ctx.storage, ctx.run, missing_ok=True) is None:
        return 0, None, None
    status = read_status(ctx.storage, ctx.run)
    return status.step, status.steps_per_hour, status.target


def probe_plan(ctx):
    """The plan the fit picks on this GPU (loads the UNet and builds the cache, like a session would)."""
    from runner.train.run import Placement

    placement = Placement.detect()
    if not placement.device.startswith("cuda"):
        t = ctx.profile.train
        return candidate_plans(t.batch_size, t.grad_accum, t.gradient_checkpointing)[0]
    from runner.checkpoint.store import FolderStore, ensure_latent_cache
    from runner.train.cache import build_cache, cache_fingerprint
    from runner.train.run import TrainingRun

    store = FolderStore(ctx.storage, ctx.run, ctx.workdir)
    build = lambda d: build_cache(ctx.profile, d, bus=ctx.bus, device=placement.device)  # noqa: E731
    cache = ensure_latent_cache(store, cache_fingerprint(ctx.profile), build, ctx.bus)
    return TrainingRun(ctx.profile, cache, placement=placement, bus=ctx.bus, gpu_name=ctx.env.gpu_summary).plan
