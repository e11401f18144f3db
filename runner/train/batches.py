"""Micro-batches on the device: the cached examples a step's order names, with each example's random draws.

Owns: the draws of one slot of a step's global batch (flip, caption dropout, timestep, noise with its
offset), made from a generator seeded by (seed, step, slot) in a fixed order, so they do not depend on how
the batch is split over micro-batches and ranks, nor on when the batch is built; the text each example
trains with (cached embeddings, or the caption's token ids when the text encoders train); stacking the rows
in the dtypes the step uses and copying them to the GPU without waiting; and the fixed held-out batches of
the validation loss.

Must not: decide the order (runner.train.order), run the model, or touch the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.train.cache import CachedData
from runner.train.seeds import VALIDATION_DRAWS_TAG, generator


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt: torch.Tensor | None  # cached text conditioning; None when the text encoders train (ids instead)
    pooled: torch.Tensor | None
    time_ids: torch.Tensor
    ids: torch.Tensor | None = None  # [B, 2, 77] caption token ids, when the text encoders train


class BatchMaker:
    """Builds the micro-batches of `data` (a pure function of the step and the slots it is given)."""

    def __init__(
        self,
        data: CachedData,
        *,
        seed: int,
        caption_dropout: float,
        noise_offset: float,
        num_timesteps: int,
        token_ids: bool,
        device: torch.device,
        text_dtype: torch.dtype,
    ) -> None:
        self.data, self.seed, self.device, self.text_dtype = data, seed, device, text_dtype
        self.caption_dropout, self.noise_offset, self.num_timesteps = caption_dropout, noise_offset, num_timesteps
        self.token_ids = token_ids  # the text encoders train: batches carry token ids, not embeddings

    def draws(self, step: int, slot: int, shape: torch.Size) -> tuple[bool, bool, int, torch.Tensor]:
        """(flip, drop caption, timestep, noise) of one slot of a step's global batch, in a fixed draw order."""
        gen = generator(self.seed, step, slot)
        use_flip = bool(torch.rand(1, generator=gen).item() < 0.5)
        drop = bool(torch.rand(1, generator=gen).item() < self.caption_dropout)
        timestep = int(torch.randint(0, self.num_timesteps, (1,), generator=gen).item())
        offset = torch.randn(shape[0], 1, 1, generator=gen)
        noise = torch.randn(shape, generator=gen) + self.noise_offset * offset
        return use_flip, drop, timestep, noise

    def micro_batch(self, step: int, examples: list[int], first_slot: int) -> Batch:
        """The batch of cached examples `examples` (indices into the data), the first at `first_slot` of the
        step's global batch and the others after it."""
        data, rows = self.data, []
        for k, i in enumerate(examples):
            use_flip, drop, timestep, noise = self.draws(step, first_slot + k, data.latents[i].shape)
            use_flip = use_flip and data.latents_flip is not None
            latent = data.latents_flip[i] if use_flip else data.latents[i]
            time_ids = data.time_ids_flip[i] if use_flip else data.time_ids[i]
            rows.append((latent, noise, timestep, *self.text(i, drop), time_ids))
        return self.stack(rows)

    def validation_batch(self, n: int, i: int) -> Batch:
        """Held-out example i, the n-th of them, with its own fixed timestep and noise (the same at every step)."""
        gen = generator(self.seed, VALIDATION_DRAWS_TAG, n)
        timestep = int(torch.randint(0, self.num_timesteps, (1,), generator=gen))
        noise = torch.randn(self.data.latents[i].shape, generator=gen)
        return self.stack([(self.data.latents[i], noise, timestep, *self.text(i, False), self.data.time_ids[i])])

    def text(self, i: int, drop: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(prompt, pooled, ids) of example i, or of the empty caption when dropped: the cached embeddings,
        or, when the text encoders train, the cached token ids they encode in the step."""
        data = self.data
        if self.token_ids:
            return None, None, data.empty_ids if drop else data.ids[i]
        return (data.empty_prompt, data.empty_pooled, None) if drop else (data.prompt_embeds[i], data.pooled[i], None)

    def stack(self, rows: list[tuple]) -> Batch:
        columns = list(zip(*rows, strict=True))

        def stacked(index: int, dtype: torch.dtype) -> torch.Tensor | None:
            return None if columns[index][0] is None else self.to_device(torch.stack(columns[index]), dtype)

        return Batch(
            latents=stacked(0, torch.float32),
            noise=stacked(1, torch.float32),
            timesteps=self.to_device(torch.tensor(columns[2], dtype=torch.long), torch.long),
            prompt=stacked(3, self.text_dtype),
            pooled=stacked(4, self.text_dtype),
            ids=stacked(5, torch.long),
            time_ids=stacked(6, self.text_dtype),
        )

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """On CUDA through pinned memory, without waiting: the copy queues behind the GPU's current work."""
        if self.device.type != "cuda":
            return tensor.to(self.device, dtype)
        return tensor.to(dtype).pin_memory().to(self.device, non_blocking=True)
