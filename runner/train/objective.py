"""The diffusion loss of one micro-batch: noise the latents at their timesteps, predict with the UNet (the text
encoders first, when they train), and compare with the target (epsilon or v-prediction), Min-SNR weighted.

Must not: build batches, draw random numbers, run the backward or the optimizer.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from runner.train.batches import Batch
from runner.train.lora import TextEncoders, text_conditioning
from runner.train.prepare import weight_dtype


class DiffusionLoss:
    """`loss(batch)`: the mean loss of a micro-batch, a scalar tensor that the backward can run from."""

    def __init__(
        self,
        unet: Any,
        encoders: TextEncoders | None,
        noise_scheduler: Any,
        *,
        prediction_type: str,
        snr_gamma: float,
        precision: str,
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        self.unet, self.encoders, self.noise_scheduler = unet, encoders, noise_scheduler
        self.prediction_type, self.snr_gamma, self.precision = prediction_type, snr_gamma, precision
        self.dtype, self.memory_format = weight_dtype(precision), memory_format
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device, torch.float32)

    def autocast(self, *, cache: bool) -> Any:
        """fp16/bf16 autocast (`cache`: autocast's weight cache, which a CUDA graph capture cannot use)."""
        if self.precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=self.dtype, cache_enabled=cache)
        return nullcontext()

    def __call__(self, batch: Batch, *, autocast_cache: bool = True) -> torch.Tensor:
        """Mean diffusion loss of one micro-batch (Min-SNR weighted when snr_gamma > 0)."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
        if self.prediction_type == "v_prediction":
            target = sched.get_velocity(batch.latents, batch.noise, batch.timesteps)
        else:
            target = batch.noise
        with self.autocast(cache=autocast_cache):
            prompt, pooled = batch.prompt, batch.pooled
            if batch.ids is not None:  # eager (not compiled); inside the CUDA graph when the step is captured
                prompt, pooled = text_conditioning(self.encoders, batch.ids[:, 0], batch.ids[:, 1])
            pred = self.unet(
                noisy.to(self.dtype, memory_format=self.memory_format),
                batch.timesteps,
                encoder_hidden_states=prompt,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids},
            ).sample
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma > 0:
            per_example = per_example * self.snr_weights(batch.timesteps)
        return per_example.mean()

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
        alpha = self.alphas_cumprod[timesteps]
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr
