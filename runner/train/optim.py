"""The optimizer update of a step: the optimizer (AdamW, 8-bit AdamW or Prodigy) and its parameter groups, the
LR schedule, gradient clipping, the fp16 loss scaler, and what a non-finite loss does (the update is
skipped; too many in a row stop the run).

Must not: run the forward or the backward, build batches, know about storage; it warns through the
callback it is given.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import torch

from runner.errors import ProfileError, TrainingDiverged
from runner.profile import TrainConfig


def param_groups(
    unet_params: list[torch.nn.Parameter], text_params: list[torch.nn.Parameter], lr: float, text_lr: float | None
) -> list[dict[str, Any]]:
    """The UNet's LoRA at train.lr; the text encoders' (when trained) at lora.text_encoder_lr (else train.lr)."""
    groups: list[dict[str, Any]] = [{"params": unet_params, "lr": lr}]
    if text_params:
        groups.append({"params": text_params, "lr": text_lr or lr})
    return groups


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer over `groups`; ProfileError (naming train.optimizer) when it cannot run here."""
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ProfileError(
                "adamw8bit (bitsandbytes) needs a CUDA GPU", key="train.optimizer", hint='use optimizer = "adamw"'
            )
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ProfileError(
                "adamw8bit needs bitsandbytes", key="train.optimizer", hint="pip install bitsandbytes, or use adamw"
            ) from exc
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise ProfileError(
                "prodigy needs the prodigyopt package", key="train.optimizer", hint="pip install prodigyopt"
            ) from exc
        # Its whole state (per-parameter s, p0, exp_avg, exp_avg_sq and the step; the d estimates, kept in
        # the param groups) goes into each checkpoint like AdamW's, so a resume continues it exactly.
        with redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, decouple=True,
                           use_bias_correction=True, safeguard_warmup=cfg.warmup_steps > 0)  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


def apply_update(
    total: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: list[torch.nn.Parameter],
    max_norm: float,
    zero_grad: Callable[[], None],
) -> tuple[float, float | None, bool]:
    """Clip and apply the gradients; returns (loss, grad norm, skipped).

    With the fp16 scaler nothing here waits for the GPU until the update is queued: the loss and the
    norm are read together at the end, once a step, so the GPU never idles between the backward and
    the optimizer while the CPU catches up."""
    max_norm = max_norm or float("inf")
    if scaler is not None:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(optimizer)  # skips the update itself on inf/NaN gradients
        scaler.update()
        loss, norm_value = torch.stack([total.float(), norm.float()]).tolist()
        finite = math.isfinite(loss) and math.isfinite(norm_value)
        return loss, (norm_value if math.isfinite(norm_value) else None), not finite
    loss = float(total)
    if not math.isfinite(loss):
        zero_grad()
        return loss, None, True
    norm_value = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(norm_value):
        return loss, None, True
    optimizer.step()
    return loss, norm_value, False


def advance_schedule(lr_scheduler: Any) -> None:
    """One step of the LR schedule, also after a skipped update: the rate is a function of the step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        lr_scheduler.step()


@dataclass
class NanGuard:
    """Non-finite losses: in a row (reset by a finite one) and in all; part of the saved state."""

    max_in_a_row: int
    streak: int = 0
    total: int = 0

    def record(self, step: int, loss: float, warn: Callable[[str], None]) -> None:
        """Count `loss`; warn of a non-finite one, and raise TrainingDiverged at train.max_nan_steps in a row."""
        if math.isfinite(loss):
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        warn(f"step {step}: non-finite loss, update skipped ({self.streak} in a row)")
        if self.streak >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.streak} non-finite losses in a row (train.max_nan_steps = {self.max_in_a_row})",
                hint='lower train.lr, set train.precision = "fp32" or "bf16", or use the fp16-fix VAE for the cache',
            )
