"""Backing off after an out-of-memory at any step: one rung down the fit's ladder, then the same step again.

Owns: turning torch's out-of-memory error in a step into a StepOutOfMemory that names the batch shape, with
the memory the failed step held given back (`step_out_of_memory`, which the Trainer raises); turning that
into the next plan (runner.fit decides which), telling the user, and applying it to the Trainer. The step that failed changed nothing but gradients
(the Trainer raises StepOutOfMemory only before the optimizer update), so running it again from the
same state trains exactly what it would have; the ladder only goes down, so this ends.

Must not: decide plans (runner.fit does), touch storage or the checkpoint.
"""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Any

import torch

from runner import events
from runner.errors import OutOfMemory
from runner.fit import Plan, StepOutOfMemory, next_plan_after_oom, out_of_memory_at_the_bottom

log = logging.getLogger(__name__)


def step_out_of_memory(
    step: int, exc: BaseException, *, shape: str, has_graph: bool, device: torch.device
) -> StepOutOfMemory:
    """Drop what the failed step held (its frames keep the activations alive) and say which shape failed.
    The caller has already dropped its own references (the batch built ahead, the gradients)."""
    traceback.clear_frames(exc.__traceback__)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return StepOutOfMemory(step, shape, has_graph, message)


def back_off(trainer: Any, plan: Plan, error: StepOutOfMemory, *, checkpointing: str, bus: events.EventBus) -> Plan:
    """Apply the next plan down after `error` to `trainer` and return it. Raises OutOfMemory at the bottom,
    and on several GPUs (ranks would split the step differently)."""
    if plan.world_size > 1:
        raise OutOfMemory(
            f"step {error.step} (latent shape {error.shape}) ran out of memory on one of {plan.world_size} GPUs; "
            "backing off during a multi-GPU run is not supported yet",
            hint="run the same command again: the fit then probes the largest batch shape before training",
        )
    new = next_plan_after_oom(plan, checkpointing=checkpointing, shape=error.shape, has_graph=error.has_graph)
    if new is None:
        raise out_of_memory_at_the_bottom(plan, error)
    reason = (
        f"out of memory at step {error.step} (latent shape {error.shape}); now {new.describe()}, "
        f"effective batch unchanged ({new.effective_batch})"
    )
    log.warning(reason)
    bus.emit(events.Warning(reason, kind="out-of-memory"))
    bus.emit(events.Planned(new.micro_batch, new.grad_accum, new.gradient_checkpointing, reason))
    trainer.apply_plan(new)
    return new
