"""The Trainer: one optimizer step at a time, resumable from the step number alone.

Owns: precision (fp16 autocast + GradScaler, bf16, fp32), the optimizer, the
LR schedule, the diffusion loss (epsilon / v-prediction, Min-SNR, noise offset,
caption dropout), the text encoders' forward when their LoRA is trained
(from cached token ids, each step), gradient accumulation, non-finite loss handling, validation
loss, and saving / restoring the trainer state as safetensors + JSON. It is the
only place backward() runs.

Randomness: each example's flip, caption dropout, timestep and noise come from
a generator seeded by (seed, step, its slot in the global batch), so they do not
depend on how the batch is split over micro-batches and ranks; LoRA dropout
uses the global RNG, reseeded before every micro-batch from (seed, step, the
global slot of its first example), so its masks do not depend on the process
count either while the micro-batch size is the same. Nothing random survives
a step, so resume needs the step only.

Must not: know about storage, clocks, checkpoint policy or the dashboard; it
emits Warnings only (the session emits StepDone).
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import re
import traceback
import warnings
from collections import Counter
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from runner.clock import Clock, SystemClock
from runner.errors import ModelError, ProfileError, TrainingDiverged
from runner.events import EventBus, ShapeReady, Warning
from runner.fit import Plan, StepOutOfMemory, is_oom_error
from runner.profile import Profile
from runner.train.cache import CachedData
from runner.train.compiling import CompileState, compile_available, compile_blocks, uncompile
from runner.train.eightbit import check_8bit_available, quantize_8bit
from runner.train.grads import FlatGrads
from runner.train.graphs import MicroBatchGraphs, checkpoint_without_rng, shape_key
from runner.train.lora import (
    TextEncoders,
    attach_lora,
    attach_text_encoder_lora,
    has_lora,
    load_lora_state_dict,
    lora_forward_order,
    lora_parameters,
    lora_tensors,
    set_lora_input_casts,
    text_conditioning,
)
from runner.train.model import training_scheduler
from runner.train.order import StepOrder, batches_per_epoch, split_validation
from runner.train.seeds import derive_seed, generator

log = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = 1
DROPOUT_TAG = 1  # separates the LoRA-dropout seed from the per-example seeds
LORA_INIT_TAG = 2
VALIDATION_TAG = 3
TEXT_LORA_INIT_TAG = 4
AUTO_COMPILE = "graphs"  # what train.compile = "auto" uses on a CUDA GPU: bench/RESULTS.md says why
MAX_GRAPH_SHAPES = 6  # CUDA graphs for the most frequent latent shapes only; a new one recaptures the others
CHANNELS_LAST = False  # CUDA: the UNet's convolutions in NHWC, as tensor cores (a T4's too) run them: no layout
# transposes around each cuDNN call. Off until a whole step is measured with it (bench/RESULTS.md, 2026-12-07: the
# convolutions alone ran 1.3-3x faster, but its first compile outran 180 s). CPU runs always keep NCHW.


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    skipped: bool
    seconds: float
    setup_s: float = 0.0  # of `seconds`, the first run of new batch shapes (compile and capture): budget setup cost


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt: torch.Tensor | None  # cached text conditioning; None when the text encoders train (ids instead)
    pooled: torch.Tensor | None
    time_ids: torch.Tensor
    ids: torch.Tensor | None = None  # [B, 2, 77] caption token ids, when the text encoders train


BF16_CAPABILITY = (8, 0)  # Ampere and later run bf16 natively


def has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself. Not torch.cuda.is_bf16_supported(): that also counts
    emulation and says True on a T4 (sm_75), where bf16 runs slower than fp16 (issue 14, item 2)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_CAPABILITY


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """The precision actually used: fp32 on CPU; on CUDA bf16 only where the GPU has it, else fp16.

    The one place that decides it: the Trainer's autocast and the frozen UNet's dtype both follow it."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if requested in ("bf16", "auto") and has_native_bf16(device):
        return "bf16"
    return "fp32" if requested == "fp32" else "fp16"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda _: None))


def host_copies(*groups: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Contiguous host-memory copies of each group of tensors, which later in-place updates cannot reach.

    GPU tensors are copied without blocking (into pinned memory) and waited for once, at the end:
    a wait per tensor would cost more than the ~3,400 copies of a full-size LoRA and its AdamW state.
    """
    copies, devices = [], set()
    for group in groups:
        out = {}
        for key, tensor in group.items():
            tensor = tensor.detach()
            if tensor.device.type == "cpu":
                out[key] = tensor.clone(memory_format=torch.contiguous_format)
            else:
                devices.add(tensor.device)
                out[key] = tensor.contiguous().to("cpu", non_blocking=tensor.is_cuda)
        copies.append(out)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return copies


@dataclass(frozen=True)
class StateSnapshot:
    """A training state copied out by `Trainer.snapshot_state`; `write` saves it as `save_state` does."""

    lora: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in (self.lora, self.optimizer) for t in group.values())

    def write(self, directory: Path) -> dict[str, Any]:
        """lora.safetensors and optimizer.safetensors into `directory`; the JSON-able rest (a copy)."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.lora, str(directory / LORA_FILE))
        save_file(self.optimizer, str(directory / OPTIMIZER_FILE))
        return json.loads(json.dumps(self.meta))


class Trainer:
    """Trains the UNet's LoRA on cached latents (and, given `text_encoders`, their LoRA on the cached caption
    tokens). `step(s)` is a pure function of the state after step s-1."""

    def __init__(
        self,
        profile: Profile,
        data: CachedData,
        unet: Any,
        *,
        micro_batch: int,
        grad_accum: int,
        gradient_checkpointing: bool,
        device: str | torch.device,
        eager_shapes: tuple[str, ...] = (),
        rank: int = 0,
        world: int = 1,
        bus: EventBus | None = None,
        clock: Clock | None = None,
        text_encoders: TextEncoders | None = None,
        compile_state: CompileState | None = None,
    ) -> None:
        self.profile, self.data, self.unet, self.bus = profile, data, unet, bus
        self.encoders = text_encoders if profile.lora.text_encoder else None
        self.compile_state = compile_state or CompileState()  # shared with the other trainers of one UNet
        self.clock = clock or SystemClock()
        self.cfg, self.seed = profile.train, profile.train.seed
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.precision = resolve_precision(self.cfg.precision, self.device)
        if self.precision == "fp32" and self.cfg.precision in ("fp16", "bf16") and self.device.type != "cuda":
            self._warn(f"train.precision = {self.cfg.precision} is not available on CPU; training in fp32", "precision")
        self.nan_streak, self.nan_total = 0, 0
        self.noise_scheduler = training_scheduler(self.cfg.prediction_type)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.train_index, self.val_index = split_validation(len(data), profile.data.validation_count, self.seed)
        self.order = StepOrder([data.buckets[i] for i in self.train_index], micro_batch, grad_accum, world, self.seed)
        self.gradient_checkpointing, self.eager_shapes = gradient_checkpointing, frozenset(eager_shapes)
        self.shape_setup_s: dict[str, float] = {}  # seconds of each latent shape's first micro-batch
        self._shape = ""  # the latent shape of the micro-batch running now
        self.channels_last = CHANNELS_LAST and self.device.type == "cuda"
        self._memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self._prepare_unet(gradient_checkpointing)
        self._prepare_text_encoders()
        self.unet_params = lora_parameters(unet)
        self.text_params = [p for _, e in self.encoders.named() for p in lora_parameters(e)] if self.encoders else []
        self.params = self.unet_params + self.text_params
        self.trainable_params = sum(p.numel() for p in self.params)
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = self._make_lr_scheduler()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # one flat gradient buffer: what a CUDA graph accumulates into, and what ranks exchange
        self.grads = self._flat_grads() if self.compiled == "graphs" or world > 1 else None
        self.graphs = self._new_graphs() if self.compiled == "graphs" else None
        self.compile_proven = False  # set by the first step that ran compiled: failures after it are real
        self._ahead: tuple[tuple[int, int], Batch] | None = None  # the next micro-batch, built early

    # --- setup ---------------------------------------------------------------------------

    def _warn(self, message: str, kind: str) -> None:
        log.warning(message)
        if self.bus is not None:
            self.bus.emit(Warning(message, kind=kind))

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    def _prepare_unet(self, gradient_checkpointing: bool) -> None:
        unet = self.unet
        if not lora_parameters(unet):
            with torch.random.fork_rng(devices=[]):  # LoRA init must not depend on the caller's RNG
                torch.manual_seed(derive_seed(self.seed, LORA_INIT_TAG))
                attach_lora(unet, self.profile.lora)
        if unet.dtype != self.weight_dtype:
            unet.to(dtype=self.weight_dtype)
        unet.to(self.device)
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)  # the 4-D (conv) weights; LoRA's are made dense again below
        for param in lora_parameters(unet):
            # LoRA weights stay fp32 whatever the UNet's dtype, and dense in their own order (a conv LoRA's too):
            # their .grad views of the flat buffer and the fused AdamW read them element by element
            param.data = param.data.float().contiguous()
        self.compiled = self._compile_mode()
        if gradient_checkpointing:  # graphs: the capture forbids saving the RNG state, and nothing draws any
            unet.enable_gradient_checkpointing(checkpoint_without_rng if self.compiled == "graphs" else None)
        elif getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()  # a UNet reused after a probe at another plan
        set_lora_input_casts(unet, enabled=self.precision == "fp32")  # autocast picks the matmul dtype
        if self.compiled:
            compile_blocks(unet)
        unet.train()

    def _prepare_text_encoders(self) -> None:
        """LoRA on both text encoders (seeded like the UNet's), frozen weights in the UNet's dtype or 8-bit."""
        lora = self.profile.lora
        if not lora.text_encoder:
            return
        if self.encoders is None:
            raise ModelError("lora.text_encoder = true, but the trainer was given no text encoders")
        if self.data.ids is None:
            raise ModelError(
                "the latent cache has no caption token ids, which training the text encoders needs",
                hint="delete the run's cache/ folder so it is built again",
            )
        if lora.text_encoder_8bit:
            check_8bit_available(self.device)
        for _, encoder in self.encoders.named():
            if has_lora(encoder):
                continue
            if encoder.dtype != self.weight_dtype:
                encoder.to(dtype=self.weight_dtype)
            if lora.text_encoder_8bit:
                quantize_8bit(encoder, self.device)
        if not any(has_lora(e) for _, e in self.encoders.named()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, TEXT_LORA_INIT_TAG))
                attach_text_encoder_lora(self.encoders, lora)
        for _, encoder in self.encoders.named():
            encoder.to(self.device)
            for param in lora_parameters(encoder):
                param.data = param.data.float()
            set_lora_input_casts(encoder, enabled=self.precision == "fp32")
            encoder.train()

    def _flat_grads(self) -> FlatGrads:
        # the text encoders run first in the forward, so their gradients finish last in the backward
        unet_count = len(self.unet_params)
        text_order = list(range(unet_count, len(self.params)))
        return FlatGrads(self.params, self.world, text_order + lora_forward_order(self.unet))

    def _compile_mode(self) -> str | None:
        """The train.compile mode this device can run ("blocks" or "graphs"); None: eager."""
        wanted = self.cfg.compile
        if wanted == "off":
            return None
        ok, why = compile_available(self.device, self.compile_state)
        if not ok:
            if wanted != "auto":
                self._warn(f"train.compile = {wanted}, but {why}; training eagerly", "compile")
            return None
        mode = AUTO_COMPILE if wanted == "auto" else wanted
        if mode == "graphs" and self.profile.lora.text_encoder_8bit and self.profile.lora.text_encoder:
            if wanted == "graphs":  # bitsandbytes' int8 matmul is not known to be safe inside a capture
                self._warn("train.compile = graphs with 8-bit text encoders: compiling blocks only", "compile")
            mode = "blocks"
        if mode == "graphs" and self.profile.lora.dropout > 0:
            if wanted == "graphs":
                self._warn("train.compile = graphs needs lora.dropout = 0; compiling blocks only", "compile")
            mode = "blocks"
        return mode

    def _param_groups(self) -> list[dict[str, Any]]:
        """The UNet's LoRA at train.lr; the text encoders' (when trained) at lora.text_encoder_lr."""
        groups: list[dict[str, Any]] = [{"params": self.unet_params, "lr": self.cfg.lr}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": self.profile.lora.text_encoder_lr or self.cfg.lr})
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "adamw8bit":
            if self.device.type != "cuda":
                raise ProfileError(
                    "adamw8bit (bitsandbytes) needs a CUDA GPU", key="train.optimizer", hint='use optimizer = "adamw"'
                )
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise ProfileError(
                    "adamw8bit needs bitsandbytes", key="train.optimizer", hint="pip install bitsandbytes, or use adamw"
                ) from exc
            return bnb.optim.AdamW8bit(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
                return Prodigy(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay, decouple=True,
                               use_bias_correction=True, safeguard_warmup=cfg.warmup_steps > 0)  # fmt: skip
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

    def _make_lr_scheduler(self) -> Any:
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            self.cfg.lr_scheduler,
            self.optimizer,
            num_warmup_steps=self.cfg.warmup_steps,
            num_training_steps=self.cfg.steps,
        )

    # --- one step --------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.precision in ("fp16", "bf16"):  # a CUDA graph capture cannot use autocast's weight cache
            return torch.autocast("cuda", dtype=self.weight_dtype, cache_enabled=self.graphs is None)
        return nullcontext()

    def _example_draws(self, step: int, slot: int, shape: torch.Size) -> tuple[bool, bool, int, torch.Tensor]:
        """(flip, drop caption, timestep, noise) of one slot of a step's global batch, in a fixed draw order."""
        gen = generator(self.seed, step, slot)
        use_flip = bool(torch.rand(1, generator=gen).item() < 0.5)
        drop = bool(torch.rand(1, generator=gen).item() < self.profile.data.caption_dropout)
        timestep = int(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=gen).item())
        offset = torch.randn(shape[0], 1, 1, generator=gen)
        noise = torch.randn(shape, generator=gen) + self.cfg.noise_offset * offset
        return use_flip, drop, timestep, noise

    def _batch(self, step: int, micro: int) -> Batch:
        positions = self.order.micro(step, micro, self.rank)
        first_slot = self.order.slot_offset(micro, self.rank)
        data, rows = self.data, []
        for k, position in enumerate(positions):
            i = self.train_index[position]
            use_flip, drop, timestep, noise = self._example_draws(step, first_slot + k, data.latents[i].shape)
            use_flip = use_flip and data.latents_flip is not None
            latent = data.latents_flip[i] if use_flip else data.latents[i]
            time_ids = data.time_ids_flip[i] if use_flip else data.time_ids[i]
            rows.append((latent, noise, timestep, *self._text(i, drop), time_ids))
        return self._stack(rows)

    def _text(self, i: int, drop: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(prompt, pooled, ids) of example i, or of the empty caption when dropped: the cached embeddings,
        or, when the text encoders train, the cached token ids they encode in the step."""
        data = self.data
        if self.encoders is not None:
            return None, None, data.empty_ids if drop else data.ids[i]
        return (data.empty_prompt, data.empty_pooled, None) if drop else (data.prompt_embeds[i], data.pooled[i], None)

    def _stack(self, rows: list[tuple]) -> Batch:
        columns = list(zip(*rows, strict=True))

        def stacked(index: int, dtype: torch.dtype) -> torch.Tensor | None:
            return None if columns[index][0] is None else self._to_device(torch.stack(columns[index]), dtype)

        return Batch(
            latents=stacked(0, torch.float32),
            noise=stacked(1, torch.float32),
            timesteps=self._to_device(torch.tensor(columns[2], dtype=torch.long), torch.long),
            prompt=stacked(3, self.weight_dtype),
            pooled=stacked(4, self.weight_dtype),
            ids=stacked(5, torch.long),
            time_ids=stacked(6, self.weight_dtype),
        )

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """On CUDA through pinned memory, without waiting: the copy queues behind the GPU's current work."""
        if self.device.type != "cuda":
            return tensor.to(self.device, dtype)
        return tensor.to(dtype).pin_memory().to(self.device, non_blocking=True)

    def _take_batch(self, step: int, micro: int) -> Batch:
        """The micro-batch, built ahead of time while the GPU ran the previous one when it could be."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (step, micro):
            return ahead[1]
        return self._batch(step, micro)

    def _build_ahead(self, step: int, micro: int) -> None:
        """Build the micro-batch after (step, micro) now, while the GPU works (CUDA only). Every draw in it
        is seeded by its own (step, slot), so building early changes nothing it contains."""
        if self.device.type != "cuda":
            return
        following = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
        self._ahead = (following, self._batch(*following))

    def _loss(self, batch: Batch) -> torch.Tensor:
        """Mean diffusion loss of one micro-batch (Min-SNR weighted when snr_gamma > 0)."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
        if self.cfg.prediction_type == "v_prediction":
            target = sched.get_velocity(batch.latents, batch.noise, batch.timesteps)
        else:
            target = batch.noise
        with self._autocast():
            prompt, pooled = batch.prompt, batch.pooled
            if batch.ids is not None:  # eager (not compiled); inside the CUDA graph when the step is captured
                prompt, pooled = text_conditioning(self.encoders, batch.ids[:, 0], batch.ids[:, 1])
            pred = self.unet(
                noisy.to(self.weight_dtype, memory_format=self._memory_format),
                batch.timesteps,
                encoder_hidden_states=prompt,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids},
            ).sample
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma > 0:
            per_example = per_example * self._snr_weights(batch.timesteps)
        return per_example.mean()

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
        alpha = self.alphas_cumprod[timesteps]
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=self.cfg.snr_gamma)
        return clipped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else clipped / snr

    def step(self, step: int) -> StepResult:
        """Run optimizer step `step` (0-based): grad_accum micro-batches, then one update (skipped when non-finite).

        Call it with consecutive steps from where the trainer stands (0 when new, the checkpoint's step after
        load_state): the data, noise and dropout follow the step number, the LR schedule follows the calls."""
        started = self.clock.monotonic()
        lr = float(self.lr_scheduler.get_last_lr()[0])
        self._zero_grad()
        setup_before = sum(self.shape_setup_s.values())
        try:
            try:
                losses = self._micro_batches(step)
            except Exception as exc:
                if not self.compiled or self.compile_proven or is_oom_error(exc):
                    raise
                self._fall_back_to_eager(exc)
                losses = self._micro_batches(step)
        except Exception as exc:
            if is_oom_error(exc):  # nothing but the gradients changed yet: the step can run again
                raise self._step_out_of_memory(step, exc) from None
            raise
        self.compile_proven = True
        if self.grads is not None:
            self.grads.average()  # the sums the last backward's all-reduce left, loss included
            total = self.grads.loss
        else:
            total = torch.stack(losses).sum()
        total, grad_norm, skipped = self._update(total)
        with warnings.catch_warnings():  # a skipped update still advances the schedule: lr is a function of the step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.lr_scheduler.step()
        self._track_nan(step, total)
        setup_s = sum(self.shape_setup_s.values()) - setup_before
        return StepResult(total, lr, grad_norm, skipped, self.clock.monotonic() - started, max(setup_s, 0.0))

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        losses = []
        for micro in range(self.grad_accum):
            # LoRA dropout: keyed by the global slot, not the rank, so any split of the batch draws the same
            torch.manual_seed(derive_seed(self.seed, step, self.order.slot_offset(micro, self.rank), DROPOUT_TAG))
            batch = self._take_batch(step, micro)
            reduce = self.world > 1 and micro == self.grad_accum - 1  # ranks exchange once a step
            self._shape = shape_key(batch)
            first, started = self._shape not in self.shape_setup_s, self.clock.monotonic()
            losses.append(self.graphs.run(batch, reduce) if self.graphs else self._micro(batch, reduce))
            if first:
                self._shape_ready(self._shape, started)
            self._build_ahead(step, micro)  # a replayed graph returns at once: the CPU is free meanwhile
        return losses

    def _shape_ready(self, shape: str, started: float) -> None:
        """Time a shape's first micro-batch (its compile and capture), once: the GPU is waited for here only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.clock.monotonic() - started
        self.shape_setup_s[shape] = seconds
        graphed = self.graphs is not None and self.graphs.is_graphed(shape)
        log.info("batch shape %s ready in %.1f s (%s)", shape, seconds, "CUDA graph" if graphed else "no graph")
        if self.bus is not None:
            self.bus.emit(ShapeReady(shape, seconds, graphed))

    def _step_out_of_memory(self, step: int, exc: BaseException) -> StepOutOfMemory:
        """Drop what the failed step held (its frames keep the activations alive) and say which shape failed."""
        traceback.clear_frames(exc.__traceback__)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        has_graph = self.graphs is not None and self.graphs.is_graphed(self._shape)
        self._ahead = None
        self._zero_grad()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return StepOutOfMemory(step, self._shape, has_graph, message)

    def apply_plan(self, plan: Plan) -> None:
        """Continue at another plan (a back-off): the weights, optimizer, LR schedule and scaler are kept.

        A change of checkpointing drops every CUDA graph (they were captured without it); a new eager
        shape drops that shape's graphs; a new split only changes which examples each micro-batch takes."""
        self.micro_batch, self.grad_accum = plan.micro_batch, plan.grad_accum
        self.order = StepOrder(self.order.buckets, plan.micro_batch, plan.grad_accum, self.world, self.seed)
        self._ahead = None
        if plan.gradient_checkpointing != self.gradient_checkpointing:
            self.gradient_checkpointing = plan.gradient_checkpointing
            if plan.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing(checkpoint_without_rng if self.compiled == "graphs" else None)
            else:
                self.unet.disable_gradient_checkpointing()
            if self.graphs is not None:
                self.graphs = None  # free the old pool before the new graphs capture into a fresh one
                gc.collect()
                torch.cuda.empty_cache()
                self.graphs = self._new_graphs()
            self.shape_setup_s.clear()  # every shape compiles and captures again
        self.eager_shapes = frozenset(plan.eager_shapes)
        if self.graphs is not None:
            for shape in self.eager_shapes - self.graphs.eager_shapes:
                self.graphs.run_eager(shape)
                self.shape_setup_s.pop(shape, None)
        self._zero_grad()

    def _fall_back_to_eager(self, exc: Exception) -> None:
        """torch.compile or the graph capture failed on the first step (a missing compiler, an unsupported
        GPU): warn, undo it, and run the step again eagerly. Later failures are real errors and raise."""
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self._warn(f"train.compile = {self.cfg.compile} failed ({reason[:300]}); training eagerly", "compile")
        log.debug("compile failure", exc_info=exc)
        uncompile(self.unet, reason, self.compile_state)
        self.compiled, self.graphs = None, None
        self._zero_grad()

    def _new_graphs(self) -> MicroBatchGraphs:
        return MicroBatchGraphs(
            self._micro,
            self.params,
            self.grads.flat,
            capture_shapes=self._capture_shapes(),
            eager_shapes=self.eager_shapes,
        )

    def _capture_shapes(self) -> frozenset[str]:
        """The MAX_GRAPH_SHAPES most frequent latent shapes of the training examples: a graph pays for its
        compile and capture over many steps; a rare shape runs compiled-eager instead."""
        counts = Counter("x".join(str(n) for n in self.data.latents[i].shape) for i in self.train_index)
        return frozenset(shape for shape, _ in counts.most_common(MAX_GRAPH_SHAPES))

    def largest_shape_step(self) -> int:
        """The first step of epoch 0 whose batch has the largest latent shape (most pixels): what the fit
        probes, since every other bucket then fits too."""
        per_epoch = batches_per_epoch(self.order.buckets, self.order.global_batch)
        size = {s: self.data.latents[self.train_index[self.order.step_batch(s)[0]]].numel() for s in range(per_epoch)}
        return max(range(per_epoch), key=lambda s: (size[s], -s))

    def release_graphs(self) -> None:
        """Free the CUDA graphs and their memory pool (before sampling); the next step captures again."""
        if self.graphs is not None:
            self.graphs = self._new_graphs()
            torch.cuda.empty_cache()

    def _micro(self, batch: Batch, reduce: bool = False) -> torch.Tensor:
        """Forward, loss and (scaled) backward of one micro-batch; the loss, already divided by grad_accum.

        With `reduce` the gradients (and loss) are then summed over ranks: inside a CUDA graph capture bucket
        by bucket while the backward runs (captured once, so the launches cost nothing on replay); eagerly in
        one all-reduce after it, from this thread."""
        loss = self._loss(batch) / self.grad_accum
        if self.grads is not None:
            self.grads.add_loss(loss)
        overlap = reduce and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if overlap:
            self.grads.begin_reduce()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if overlap:
            self.grads.end_reduce()
        elif reduce:
            self.grads.reduce_now()
        return loss.detach()

    def _zero_grad(self) -> None:
        """Clear the gradients: in place in the flat buffer (a CUDA graph accumulates into the buffers it was
        captured with, and ranks exchange it), else by dropping them."""
        if self.grads is not None:
            self.grads.zero()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _update(self, total: torch.Tensor) -> tuple[float, float | None, bool]:
        """Clip and apply the gradients; returns (loss, grad norm, skipped).

        With the fp16 scaler nothing here waits for the GPU until the update is queued: the loss and the
        norm are read together at the end, once a step, so the GPU never idles between the backward and
        the optimizer while the CPU catches up."""
        max_norm = self.cfg.max_grad_norm or float("inf")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
            loss, norm_value = torch.stack([total.float(), norm.float()]).tolist()
            finite = math.isfinite(loss) and math.isfinite(norm_value)
            return loss, (norm_value if math.isfinite(norm_value) else None), not finite
        loss = float(total)
        if not math.isfinite(loss):
            self._zero_grad()
            return loss, None, True
        norm_value = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm_value):
            return loss, None, True
        self.optimizer.step()
        return loss, norm_value, False

    def _track_nan(self, step: int, total: float) -> None:
        if math.isfinite(total):
            self.nan_streak = 0
            return
        self.nan_streak += 1
        self.nan_total += 1
        self._warn(f"step {step}: non-finite loss, update skipped ({self.nan_streak} in a row)", "nan")
        if self.nan_streak >= self.cfg.max_nan_steps:
            raise TrainingDiverged(
                f"{self.nan_streak} non-finite losses in a row (train.max_nan_steps = {self.cfg.max_nan_steps})",
                hint='lower train.lr, set train.precision = "fp32" or "bf16", or use the fp16-fix VAE for the cache',
            )

    # --- validation ------------------------------------------------------------------------

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the held-out examples with fixed noise and timesteps (comparable across steps); NaN
        when data.validation_count = 0."""
        if not self.val_index:
            return float("nan")
        modules = [self.unet, *(e for _, e in self.encoders.named())] if self.encoders else [self.unet]
        for module in modules:
            module.eval()
        try:
            losses = []
            for n, i in enumerate(self.val_index):
                gen = generator(self.seed, VALIDATION_TAG, n)
                timestep = int(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=gen))
                noise = torch.randn(self.data.latents[i].shape, generator=gen)
                row = (self.data.latents[i], noise, timestep, *self._text(i, False), self.data.time_ids[i])
                losses.append(float(self._loss(self._stack([row]))))
        finally:
            for module in modules:
                module.train()
        return sum(losses) / len(losses)

    # --- state -----------------------------------------------------------------------------

    def save_state(self, directory: Path) -> dict[str, Any]:
        """Write lora.safetensors and optimizer.safetensors into `directory`; return the JSON-able rest."""
        return self.snapshot_state().write(directory)

    def snapshot_state(self) -> StateSnapshot:
        """Everything `save_state` writes, copied to host memory now; writing it can wait (another thread).

        Later steps update the weights and the optimizer state in place, so the tensors are copied,
        never referenced, CPU included. From a GPU the copies are queued at once into pinned memory
        and waited for once.
        """
        state = self.optimizer.state_dict()
        tensors, extra = {}, {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{name}"] = value
                else:
                    extra[f"{index}.{name}"] = value
        meta = {
            "format": STATE_FORMAT,
            "param_groups": _json_safe(state["param_groups"]),
            "optimizer_extra": _json_safe(extra),
            "lr_scheduler": _json_safe(self.lr_scheduler.state_dict()),
            "scaler": _json_safe(self.scaler.state_dict()) if self.scaler else None,
            "nan_streak": self.nan_streak,
            "nan_total": self.nan_total,
            "precision": self.precision,
        }
        lora, optimizer = host_copies(lora_tensors(self.unet, self.encoders), tensors)
        return StateSnapshot(lora, optimizer, meta)

    def load_state(self, directory: Path, meta: dict[str, Any]) -> None:
        """Restore everything `save_state` wrote. A failure raises; nothing is silently left at its default."""
        load_lora_state_dict(self.unet, load_file(str(directory / LORA_FILE)), self.encoders)
        for param in self.params:
            param.data = param.data.float()
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in load_file(str(directory / OPTIMIZER_FILE)).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        for key, value in meta["optimizer_extra"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.nan_streak, self.nan_total = meta["nan_streak"], meta["nan_total"]
