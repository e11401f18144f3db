"""The VRAM fit: which micro-batch, accumulation and gradient checkpointing fit the GPU.

Owns: the `Plan` record (stored in RunState), the order in which plans are tried,
the back-off loop over a probe, the back-off ladder after an out-of-memory at any
later step (`next_plan_after_oom`: it only goes down, so it never loops),
recognising out-of-memory errors, and the sentence that tells the user what
changed when a resume lands on another GPU.

Must not: touch the GPU or import torch. The session supplies the probe (one real
step under a plan); this module only decides what to try next. It never lowers
the resolution or the rank: those change the trained weights, so it suggests them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from runner.errors import CheckpointCorrupt, OutOfMemory, ProfileError

log = logging.getLogger(__name__)

# Fragments of the messages PyTorch raises when an allocation fails on the accelerator.
OOM_MESSAGES = (
    "cuda out of memory",
    "cuda error: out of memory",
    "cublas_status_alloc_failed",
    "hip out of memory",
    "mps backend out of memory",
)


OOM_CHAIN_DEPTH = 3  # an error, what it was raised from or while handling, and one more


@dataclass(frozen=True)
class Plan:
    """How one optimizer step is split on each GPU."""

    micro_batch: int
    """Examples per forward/backward pass on one GPU."""
    grad_accum: int
    """Micro-batches accumulated per optimizer step on one GPU (per-rank accumulation)."""
    gradient_checkpointing: bool
    """Recompute UNet activations in the backward pass (less memory, ~20-30 % slower)."""
    world_size: int = 1
    """GPUs training together (DDP)."""
    eager_shapes: tuple[str, ...] = ()
    """Latent shapes ("CxHxW") that run compiled-eager, never as a CUDA graph (an out-of-memory backed them off)."""

    @property
    def per_rank_batch(self) -> int:
        """Examples per optimizer step on one GPU: the run's effective batch over the session's GPUs."""
        return self.micro_batch * self.grad_accum

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all GPUs: the run's (train.batch_size × train.grad_accum), whatever
        the GPU count and micro-batch of the session."""
        return self.per_rank_batch * self.world_size

    def describe(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        gpus = f" on {self.world_size} GPUs" if self.world_size > 1 else ""
        eager = f", eager for shape {', '.join(self.eager_shapes)}" if self.eager_shapes else ""
        return (
            f"micro-batch {self.micro_batch} × {self.grad_accum} accumulation{gpus}, "
            f"gradient checkpointing {ckpt}{eager}"
        )

    def same_split(self, other: Plan) -> bool:
        """True when both plans split a step the same way (eager shapes aside): the same reduction order."""
        return (self.micro_batch, self.grad_accum, self.gradient_checkpointing, self.world_size) == (
            other.micro_batch,
            other.grad_accum,
            other.gradient_checkpointing,
            other.world_size,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """A stored plan (from RunState). Raises CheckpointCorrupt when it is not one."""
        try:
            plan = cls(
                micro_batch=int(data["micro_batch"]),
                grad_accum=int(data["grad_accum"]),
                gradient_checkpointing=bool(data["gradient_checkpointing"]),
                world_size=int(data.get("world_size", 1)),
                eager_shapes=tuple(str(shape) for shape in data.get("eager_shapes", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorrupt(
                f"the stored fit plan is unreadable ({exc!r}): {data!r}", path="state.json"
            ) from None
        if min(plan.micro_batch, plan.grad_accum, plan.world_size) < 1:
            raise CheckpointCorrupt(f"the stored fit plan has a count below 1: {data!r}", path="state.json")
        return plan


@dataclass(frozen=True)
class ProbeResult:
    """What one probe step under a plan showed."""

    fits: bool
    peak_gib: float | None = None
    """Peak GPU memory of the step (or when it failed), if known."""
    step_s: float | None = None
    """Seconds of the optimizer step, if it fitted."""
    error: str = ""
    """The out-of-memory message, when it did not fit."""


def _smaller_micro_batch(per_rank: int, micro: int) -> int:
    """The largest divisor of `per_rank` at most half of `micro` (exact halving for powers of two)."""
    for candidate in range(micro // 2, 0, -1):
        if per_rank % candidate == 0:
            return candidate
    return 1


def candidate_plans(batch_size: int, grad_accum: int, checkpointing: str = "auto", world_size: int = 1) -> list[Plan]:
    """The plans to try, fastest first, for this session's `world_size` processes.

    The run's effective batch is batch_size × grad_accum examples per optimizer step across all processes
    (profile.TrainConfig); every plan keeps it: world_size × micro_batch × per-rank accumulation. Each
    process takes effective / world_size examples a step, so the effective batch must divide by the
    process count (ProfileError otherwise). The first micro-batch is the profile's batch_size (or the
    largest divisor of the per-process batch below it).

    auto: that micro-batch without checkpointing, then with it, then smaller micro-batches (more
    accumulation) with it, down to 1. on: the same without the first. off: smaller micro-batches,
    never checkpointing.
    """
    if checkpointing not in ("auto", "on", "off"):
        raise ProfileError(
            f"{checkpointing!r} is not allowed", key="train.gradient_checkpointing", hint="choose auto, on or off"
        )
    if min(batch_size, grad_accum, world_size) < 1:
        raise ProfileError(
            f"batch_size {batch_size} × grad_accum {grad_accum} on {world_size} GPU(s)",
            key="train.batch_size",
            hint="use positive counts",
        )
    per_rank = split_effective_batch(batch_size * grad_accum, world_size)
    first = batch_size if per_rank % batch_size == 0 else _smaller_micro_batch(per_rank, 2 * min(batch_size, per_rank))
    micro_batches = [first]
    while micro_batches[-1] > 1:
        micro_batches.append(_smaller_micro_batch(per_rank, micro_batches[-1]))
    plans = []
    if checkpointing == "auto":
        plans.append(Plan(first, per_rank // first, False, world_size))
    for micro in micro_batches:
        plans.append(Plan(micro, per_rank // micro, checkpointing != "off", world_size))
    return plans


class StepOutOfMemory(RuntimeError):
    """An out-of-memory error raised by the forward/backward of a step, before its optimizer update.

    Nothing the step changed survives it but the gradients, which the next attempt zeroes: the weights,
    the optimizer, the LR schedule and the grad scaler are as they were, so the step can run again."""

    def __init__(self, step: int, shape: str, has_graph: bool, message: str) -> None:
        super().__init__(f"out of memory at step {step}, shape {shape}: {message}")
        self.step, self.shape, self.has_graph = step, shape, has_graph


def next_plan_after_oom(plan: Plan, *, checkpointing: str, shape: str = "", has_graph: bool = False) -> Plan | None:
    """The next rung down after an out-of-memory at `plan`; None when none is left.

    The ladder: gradient checkpointing on (unless train.gradient_checkpointing = "off"), then the
    failing shape compiled-eager instead of a CUDA graph (when it ran as one), then half the micro-batch
    with twice the accumulation (effective batch unchanged), down to 1. Every rung moves one way only
    (checkpointing never turns off, eager shapes never return to graphs, the micro-batch never grows),
    so a session backs off a bounded number of times and never loops.
    """
    if not plan.gradient_checkpointing and checkpointing != "off":
        return replace(plan, gradient_checkpointing=True)
    if has_graph and shape and shape not in plan.eager_shapes:
        return replace(plan, eager_shapes=(*plan.eager_shapes, shape))
    if plan.micro_batch > 1:
        micro = _smaller_micro_batch(plan.per_rank_batch, plan.micro_batch)
        return replace(plan, micro_batch=micro, grad_accum=plan.per_rank_batch // micro)
    return None


def out_of_memory_at_the_bottom(plan: Plan, error: StepOutOfMemory) -> OutOfMemory:
    """The error that ends a session whose back-off ladder is spent."""
    return OutOfMemory(
        f"step {error.step} (latent shape {error.shape}) does not fit this GPU's free memory even at the lowest "
        f"plan, {plan.describe()}: {str(error).splitlines()[0][:300]}",
        hint=_no_fit_hint([plan]),
    )


def resume_candidates(candidates: list[Plan], stored: dict | None, *, same_gpu: bool) -> list[Plan]:
    """The candidates for a resumed run: on the same GPU model, the stored plan first (exact resume, and
    the rungs above it already ran out of memory on this data), then the ones below it; else all."""
    if not stored or not same_gpu:
        return candidates
    plan = Plan.from_dict(stored)
    for index, candidate in enumerate(candidates):
        if candidate.same_split(plan):
            return [plan, *candidates[index + 1 :]]
    return candidates


def split_effective_batch(effective: int, world_size: int) -> int:
    """Examples per process and optimizer step. ProfileError when the processes cannot share it evenly."""
    if effective % world_size:
        fits = [n for n in range(1, effective + 1) if effective % n == 0]
        raise ProfileError(
            f"the run's effective batch ({effective} = batch_size × grad_accum) cannot be split evenly over "
            f"{world_size} processes",
            key="train.grad_accum",
            hint=f"this run trains on {', '.join(map(str, fits))} GPUs (RELAY_PROCESSES=N picks fewer); the "
            "effective batch is the run's and cannot change without changing its training",
        )
    return effective // world_size


def is_oom_error(exc: BaseException | None) -> bool:
    """True for torch's OutOfMemoryError and RuntimeErrors that report an accelerator out of memory, also
    when raised while one was being handled (a CUDA-graph capture that ran out of memory can end with
    the capture's own error, the out-of-memory as its context).

    Looks torch up only if it is already imported, so callers without torch pay nothing.
    """
    for _ in range(OOM_CHAIN_DEPTH):
        if exc is None:
            return False
        if _is_oom_itself(exc):
            return True
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return False


def _is_oom_itself(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    if isinstance(exc, StepOutOfMemory) or (isinstance(oom_type, type) and isinstance(exc, oom_type)):
        return True
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def plan_fit(candidates: list[Plan], probe: Callable[[Plan], ProbeResult]) -> Plan:
    """The first candidate whose probe step fits. Raises OutOfMemory naming what was tried.

    A probe may also raise an out-of-memory error instead of returning a result;
    any other error propagates.
    """
    tried: list[tuple[Plan, ProbeResult]] = []
    for plan in candidates:
        try:
            result = probe(plan)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            result = ProbeResult(fits=False, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if result.fits:
            if tried:
                log.info("fit: %s fits after %d plan(s) ran out of memory", plan.describe(), len(tried))
            return plan
        log.info("fit: %s ran out of memory%s", plan.describe(), _peak(result))
        tried.append((plan, result))
    raise OutOfMemory(_no_fit_message(tried), hint=_no_fit_hint(candidates))


def _peak(result: ProbeResult) -> str:
    return f" (peak {result.peak_gib:.1f} GiB)" if result.peak_gib is not None else ""


def _no_fit_message(tried: list[tuple[Plan, ProbeResult]]) -> str:
    if not tried:
        return "no training plan to try (empty candidate list)"
    lines = "\n".join(f"  - {plan.describe()}: out of memory{_peak(result)}" for plan, result in tried)
    return f"no training plan fits this GPU's free memory; tried:\n{lines}"


def _no_fit_hint(candidates: list[Plan]) -> str:
    hints = []
    if candidates and not any(p.gradient_checkpointing for p in candidates):
        hints.append("allow gradient checkpointing (--set train.gradient_checkpointing=auto)")
    hints += [
        "lower the resolution (--set train.resolution=512, or the sdxl-naruto-t4-512 profile)",
        "lower the LoRA rank (--set lora.rank=8)",
        "free GPU memory held by other processes in this notebook (restart the runtime)",
    ]
    return "; or ".join(hints) + ". Resolution and rank change the trained weights, so Relay never lowers them itself"


def describe_replan(old: dict | None, new: Plan, old_gpu: str, new_gpu: str) -> str | None:
    """What changed in the plan when a run resumes (on another GPU); None when nothing did."""
    if old is None:
        return None
    before = Plan.from_dict(old)
    if before.same_split(new):
        return None
    changes = []
    for name, label in (("micro_batch", "micro-batch"), ("grad_accum", "accumulation"), ("world_size", "GPUs")):
        a, b = getattr(before, name), getattr(new, name)
        if a != b:
            changes.append(f"{label} {a} → {b}")
    if before.gradient_checkpointing != new.gradient_checkpointing:
        on_off = {True: "on", False: "off"}
        changes.append(
            f"gradient checkpointing {on_off[before.gradient_checkpointing]} → {on_off[new.gradient_checkpointing]}"
        )
    where = f"on {new_gpu} (was {old_gpu})" if new_gpu != old_gpu else f"on {new_gpu}"
    if before.effective_batch == new.effective_batch:
        batch = f"effective batch unchanged ({new.effective_batch})"
    else:
        batch = f"effective batch {before.effective_batch} → {new.effective_batch}: this changes the training"
    return f"re-planned {where}: {', '.join(changes)}; {batch}"
