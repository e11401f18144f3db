"""What a session's work costs: priors before anything is measured, robust estimates after.

Owns: the one set of priors (an optimizer step per GPU class, scaled by pixels, micro-batch and
accumulation; a checkpoint's blocking stage; its upload), and `CostMeter`, the median of the last
samples of each cost the session measured. The budget (runner.budget) decides over these figures;
`relay plan` estimates with the priors. The figures and their sources are in docs/budget.md.

Must not: decide anything, read a clock, or import torch.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# The one set of priors: what the budget assumes until the session has measured the real cost.
PRIOR_STEP_S = 10.0  # an optimizer step of unknown shape on an unknown GPU (see step_prior for known ones)
PRIOR_CHECKPOINT_S = 2.0  # copying ~0.3 GB of LoRA + AdamW state to host memory: 0.19 s measured on CPU
PRIOR_UPLOAD_S = 30.0  # writing it locally and uploading it: tens of seconds on Drive
COST_WINDOW = 15  # recent samples kept per cost; the median of these is the estimate
# Seconds per micro-batch of one 1024 px example (default plan) by GPU class; a step costs this scaled by
# pixels, micro-batch and accumulation. Estimates until a session on that GPU has measured its own.
STEP_S_PER_1024_EXAMPLE: dict[str, tuple[float, str]] = {
    "t4": (0.842, "T4 emulation (5 % of an H100's SMs, flash attention off as on a T4, 15 GiB), 1024 px micro-batch 1"),
    "h200": (0.078, "NVIDIA H200, 1024 px micro-batch 1, default plan, bench/RESULTS.md"),
    "generic": (2.5, "a cautious guess for a GPU not measured yet"),
}


# ---------------------------------------------------------------- priors


@dataclass(frozen=True)
class StepPrior:
    """An estimated optimizer-step time before any step is measured, and where the figure comes from."""

    step_s: float
    gpu_class: str
    source: str


def gpu_class(gpu_name: str) -> str:
    """The class of priors a GPU name falls in: "t4", "h200" (H100/H200-class) or "generic"."""
    name = gpu_name.upper()
    if "T4" in name:
        return "t4"
    if "H200" in name or "H100" in name:
        return "h200"
    return "generic"


def step_prior(gpu_name: str, *, resolution: int, micro_batch: int, grad_accum: int) -> StepPrior:
    """Seconds per optimizer step on one GPU of this kind: the class's 1024 px figure scaled by pixels,
    micro-batch and accumulation (a step runs grad_accum micro-batches of micro_batch examples)."""
    klass = gpu_class(gpu_name)
    per_example, source = STEP_S_PER_1024_EXAMPLE[klass]
    pixels = (resolution / 1024) ** 2
    return StepPrior(per_example * pixels * max(1, micro_batch) * max(1, grad_accum), klass, source)


def profile_step_prior(profile: Any, gpu_name: str, world: int = 1) -> StepPrior:
    """The step prior of a profile's plan with `world` GPUs sharing the effective batch."""
    t = profile.train
    per_rank = max(1, t.batch_size * t.grad_accum // max(1, world))
    return step_prior(gpu_name, resolution=t.resolution, micro_batch=1, grad_accum=per_rank)


# ---------------------------------------------------------------- measured costs


@dataclass
class RobustEstimate:
    """Median of the last `window` samples; `prior_s` until the first sample.

    The median shrugs off the slow first step (allocation, autotuning) and the odd
    slow upload, and follows a real change of pace within half a window.
    """

    prior_s: float
    window: int = COST_WINDOW
    samples: deque[float] = field(default_factory=deque)
    value: float = field(init=False)
    """The current estimate (kept up to date by `add`, since the loop reads it several times a step)."""

    def __post_init__(self) -> None:
        self.value = statistics.median(self.samples) if self.samples else self.prior_s

    def add(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self.samples.append(seconds)
        while len(self.samples) > self.window:
            self.samples.popleft()
        self.value = statistics.median(self.samples)

    @property
    def count(self) -> int:
        return len(self.samples)


class CostMeter:
    """What the session has measured: seconds per optimizer step, per checkpoint stage, per upload."""

    def __init__(
        self,
        step_prior_s: float = PRIOR_STEP_S,
        checkpoint_prior_s: float = PRIOR_CHECKPOINT_S,
        upload_prior_s: float = PRIOR_UPLOAD_S,
        window: int = COST_WINDOW,
    ) -> None:
        self.step = RobustEstimate(step_prior_s, window)
        self.checkpoint = RobustEstimate(checkpoint_prior_s, window)
        self.upload = RobustEstimate(upload_prior_s, window)

    def add_step(self, seconds: float) -> None:
        self.step.add(seconds)

    def add_checkpoint(self, seconds: float) -> None:
        """The blocking part of a checkpoint: capturing and staging it on local disk."""
        self.checkpoint.add(seconds)

    def add_upload(self, seconds: float) -> None:
        """The background part: uploading a staged checkpoint until its COMMIT.json is written."""
        self.upload.add(seconds)

    @property
    def step_s(self) -> float:
        return self.step.value

    @property
    def checkpoint_s(self) -> float:
        return self.checkpoint.value

    @property
    def upload_s(self) -> float:
        return self.upload.value
