"""The Trainer: one optimizer step at a time, resumable from the step number alone.

Owns: a step — gradient accumulation over micro-batches (each run eagerly, through compiled blocks, or
replayed as a CUDA graph), the exchange of gradients between ranks, the update, and the step's timing —
and reacting to what a step meets: a compile that fails on the first step (back to eager), an
out-of-memory (raised as StepOutOfMemory, nothing but gradients changed), a new plan after a back-off;
the validation loss. It is the only place backward() runs. Its parts, each in its own module: the
models' preparation and precision (prepare.py), the micro-batches and their draws (batches.py), the loss
(objective.py), the optimizer update (optim.py), CUDA graphs (graphs.py), compiled blocks (compiling.py),
the back-off (backoff.py) and the saved state (trainstate.py).

Randomness: each example's flip, caption dropout, timestep and noise come from
a generator seeded by (seed, step, its slot in the global batch), so they do not
depend on how the batch is split over micro-batches and ranks; LoRA dropout
uses the global RNG, reseeded before every micro-batch from (seed, step, the
global slot of its first example), so its masks do not depend on the process
count either while the micro-batch size is the same. Nothing random survives
a step, so resume needs the step only.

Must not: know about storage, clocks, checkpoint policy or the dashboard; it
emits Warnings and ShapeReady only (the session emits StepDone).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner.clock import Clock, SystemClock
from runner.events import EventBus, ShapeReady, Warning
from runner.fit import Plan, StepOutOfMemory, is_oom_error
from runner.profile import Profile
from runner.train import trainstate
from runner.train.backoff import step_out_of_memory
from runner.train.batches import Batch, BatchMaker
from runner.train.cache import CachedData
from runner.train.compiling import CompileState, compile_mode, uncompile
from runner.train.grads import FlatGrads
from runner.train.graphs import MicroBatchGraphs, capture_shapes, shape_key
from runner.train.lora import TextEncoders, lora_forward_order, lora_parameters, lora_tensors
from runner.train.model import training_scheduler
from runner.train.objective import DiffusionLoss
from runner.train.optim import NanGuard, advance_schedule, apply_update, make_lr_scheduler, make_optimizer, param_groups
from runner.train.order import StepOrder, batches_per_epoch, split_validation
from runner.train.prepare import (
    prepare_text_encoders,
    prepare_unet,
    resolve_precision,
    set_gradient_checkpointing,
    uses_channels_last,
    weight_dtype,
)
from runner.train.seeds import DROPOUT_TAG, derive_seed
from runner.train.trainstate import StateSnapshot

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    skipped: bool
    seconds: float
    setup_s: float = 0.0  # of `seconds`, the first run of new batch shapes (compile and capture): budget setup cost


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
        self.nan = NanGuard(self.cfg.max_nan_steps)
        self.noise_scheduler = training_scheduler(self.cfg.prediction_type)
        self.train_index, self.val_index = split_validation(len(data), profile.data.validation_count, self.seed)
        self.order = StepOrder([data.buckets[i] for i in self.train_index], micro_batch, grad_accum, world, self.seed)
        self.gradient_checkpointing, self.eager_shapes = gradient_checkpointing, frozenset(eager_shapes)
        self.shape_setup_s: dict[str, float] = {}  # seconds of each latent shape's first micro-batch
        self._shape = ""  # the latent shape of the micro-batch running now
        self.channels_last = uses_channels_last(self.device)
        self.compiled = self._compile_mode()
        prepare_unet(unet, profile.lora, seed=self.seed, precision=self.precision, device=self.device,
                     compiled=self.compiled, gradient_checkpointing=gradient_checkpointing)  # fmt: skip
        prepare_text_encoders(self.encoders, profile.lora, seed=self.seed, precision=self.precision,
                              device=self.device, has_token_ids=data.ids is not None)  # fmt: skip
        self.unet_params = lora_parameters(unet)
        self.text_params = [p for _, e in self.encoders.named() for p in lora_parameters(e)] if self.encoders else []
        self.params = self.unet_params + self.text_params
        self.trainable_params = sum(p.numel() for p in self.params)
        groups = param_groups(self.unet_params, self.text_params, self.cfg.lr, profile.lora.text_encoder_lr)
        self.optimizer = make_optimizer(self.cfg, groups, self.device)
        self.lr_scheduler = make_lr_scheduler(self.cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.batches, self.objective = self._batch_maker(), self._diffusion_loss()
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
        return weight_dtype(self.precision)

    def _compile_mode(self) -> str | None:
        mode, warning = compile_mode(self.cfg.compile, self.profile.lora, self.device, self.compile_state)
        if warning:
            self._warn(warning, "compile")
        return mode

    def _batch_maker(self) -> BatchMaker:
        return BatchMaker(
            self.data, seed=self.seed, caption_dropout=self.profile.data.caption_dropout,
            noise_offset=self.cfg.noise_offset, num_timesteps=self.noise_scheduler.config.num_train_timesteps,
            token_ids=self.encoders is not None, device=self.device, text_dtype=self.weight_dtype,
        )  # fmt: skip

    def _diffusion_loss(self) -> DiffusionLoss:
        return DiffusionLoss(
            self.unet, self.encoders, self.noise_scheduler, prediction_type=self.cfg.prediction_type,
            snr_gamma=self.cfg.snr_gamma, precision=self.precision, device=self.device,
            memory_format=torch.channels_last if self.channels_last else torch.preserve_format,
        )  # fmt: skip

    def _flat_grads(self) -> FlatGrads:
        # the text encoders run first in the forward, so their gradients finish last in the backward
        unet_count = len(self.unet_params)
        text_order = list(range(unet_count, len(self.params)))
        return FlatGrads(self.params, self.world, text_order + lora_forward_order(self.unet))

    def _new_graphs(self) -> MicroBatchGraphs:
        shapes = capture_shapes(self.data.latents, self.train_index)
        return MicroBatchGraphs(self._micro, self.params, self.grads.flat, capture_shapes=shapes,
                                eager_shapes=self.eager_shapes)  # fmt: skip

    # --- one step --------------------------------------------------------------------------

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
        total, grad_norm, skipped = apply_update(total, optimizer=self.optimizer, scaler=self.scaler,
                                                 params=self.params, max_norm=self.cfg.max_grad_norm,
                                                 zero_grad=self._zero_grad)  # fmt: skip
        advance_schedule(self.lr_scheduler)  # a skipped update still advances it: lr is a function of the step
        self.nan.record(step, total, lambda message: self._warn(message, "nan"))
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

    def _batch(self, step: int, micro: int) -> Batch:
        """Micro-batch `micro` of step `step` on this rank."""
        examples = [self.train_index[p] for p in self.order.micro(step, micro, self.rank)]
        return self.batches.micro_batch(step, examples, self.order.slot_offset(micro, self.rank))

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

    def _loss(self, batch: Batch) -> torch.Tensor:
        return self.objective(batch, autocast_cache=self.graphs is None)  # a capture cannot use the weight cache

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

    # --- what a step can meet ----------------------------------------------------------------

    def _step_out_of_memory(self, step: int, exc: BaseException) -> StepOutOfMemory:
        has_graph = self.graphs is not None and self.graphs.is_graphed(self._shape)
        self._ahead = None
        self._zero_grad()
        return step_out_of_memory(step, exc, shape=self._shape, has_graph=has_graph, device=self.device)

    def _fall_back_to_eager(self, exc: Exception) -> None:
        """torch.compile or the graph capture failed on the first step (a missing compiler, an unsupported
        GPU): warn, undo it, and run the step again eagerly. Later failures are real errors and raise."""
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self._warn(f"train.compile = {self.cfg.compile} failed ({reason[:300]}); training eagerly", "compile")
        log.debug("compile failure", exc_info=exc)
        uncompile(self.unet, reason, self.compile_state)
        self.compiled, self.graphs = None, None
        self._zero_grad()

    def apply_plan(self, plan: Plan) -> None:
        """Continue at another plan (a back-off): the weights, optimizer, LR schedule and scaler are kept.

        A change of checkpointing drops every CUDA graph (they were captured without it); a new eager
        shape drops that shape's graphs; a new split only changes which examples each micro-batch takes."""
        self.micro_batch, self.grad_accum = plan.micro_batch, plan.grad_accum
        self.order = StepOrder(self.order.buckets, plan.micro_batch, plan.grad_accum, self.world, self.seed)
        self._ahead = None
        if plan.gradient_checkpointing != self.gradient_checkpointing:
            self.gradient_checkpointing = plan.gradient_checkpointing
            set_gradient_checkpointing(self.unet, plan.gradient_checkpointing, self.compiled)
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
            losses = [float(self._loss(self.batches.validation_batch(n, i))) for n, i in enumerate(self.val_index)]
        finally:
            for module in modules:
                module.train()
        return sum(losses) / len(losses)

    # --- state -----------------------------------------------------------------------------

    def save_state(self, directory: Path) -> dict[str, Any]:
        """Write lora.safetensors and optimizer.safetensors into `directory`; return the JSON-able rest."""
        return self.snapshot_state().write(directory)

    def snapshot_state(self) -> StateSnapshot:
        """Everything `save_state` writes, copied to host memory now; writing it can wait (another thread)."""
        extra = {"nan_streak": self.nan.streak, "nan_total": self.nan.total, "precision": self.precision}
        lora = lora_tensors(self.unet, self.encoders)
        return trainstate.snapshot(lora, self.optimizer, self.lr_scheduler, self.scaler, extra)

    def load_state(self, directory: Path, meta: dict[str, Any]) -> None:
        """Restore everything `save_state` wrote. A failure raises; nothing is silently left at its default."""
        trainstate.restore(directory, meta, unet=self.unet, encoders=self.encoders, params=self.params,
                           optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.scaler)  # fmt: skip
        self.nan.streak, self.nan.total = meta["nan_streak"], meta["nan_total"]
