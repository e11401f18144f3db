"""The training side of a session: device, cache, UNet, memory plan, trainer.

Owns: turning a validated profile, a local cache folder and an optional
restored checkpoint into a ready Trainer — picking the device (and the rank in
a multi-GPU launch), loading only the UNet, probing the memory plan on CUDA,
restoring trainer state. The session calls it; it knows nothing of storage,
leases or the budget, and neither exports nor samples (runner.export and
runner.sample do, called by the session).
"""

from __future__ import annotations

import gc
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner import events
from runner.fit import (
    Plan,
    ProbeResult,
    StepOutOfMemory,
    candidate_plans,
    describe_replan,
    is_oom_error,
    plan_fit,
    resume_candidates,
)
from runner.profile import Profile
from runner.train.backoff import back_off
from runner.train.cache import CachedData, open_cache
from runner.train.compiling import CompileState
from runner.train.loading import load_parts
from runner.train.loop import StepResult, Trainer
from runner.train.lora import TextEncoders, load_lora_state_dict, lora_state_dict
from runner.train.prepare import resolve_precision
from runner.train.trainstate import LORA_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where this process trains: device, rank and world size (torchrun/accelerate variables)."""

    device: str
    rank: int = 0
    world: int = 1

    @classmethod
    def detect(cls, *, rank: int = 0, world: int = 1, local_rank: int = 0) -> Placement:
        """The device for this rank (the ranks come from the session's context, which read the launcher's
        variables once; the defaults are a single process)."""
        if not torch.cuda.is_available():
            return cls("cpu", rank, world)
        torch.cuda.set_device(local_rank)
        return cls(f"cuda:{local_rank}", rank, world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def unet_dtype(profile: Profile, device: str) -> torch.dtype:
    """The frozen UNet's dtype: the precision the Trainer resolves (fp32 on CPU; bf16 only on a GPU that has it)."""
    precision = resolve_precision(profile.train.precision, device)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


class TrainingRun:
    """A Trainer with its data and model, ready at a given plan and state."""

    def __init__(
        self, profile: Profile, cache_dir: Path, *, placement: Placement, bus: events.EventBus,
        stored_plan: dict | None = None, stored_gpu: str | None = None, gpu_name: str = "CPU",
    ) -> None:  # fmt: skip
        self.profile, self.placement, self.bus = profile, placement, bus
        self.data: CachedData = open_cache(cache_dir)
        parts = load_parts(
            profile.model,
            unet=True,
            text=profile.lora.text_encoder,  # trained with LoRA: encoded each step from cached token ids
            vae=False,
            device=placement.device,
            dtype=unet_dtype(profile, placement.device),
        )
        self.unet = parts.unet
        self.encoders = (
            TextEncoders(parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2)
            if profile.lora.text_encoder
            else None
        )
        self.compile_state = CompileState()  # a compile failure in a probe keeps the later trainers eager
        self.plan = self._choose_plan(stored_plan, stored_gpu, gpu_name)
        self.trainer = self._make_trainer(self.plan)

    # --- memory plan ---------------------------------------------------------------------

    def _choose_plan(self, stored: dict | None, stored_gpu: str | None, gpu_name: str) -> Plan:
        cfg = self.profile.train
        candidates = candidate_plans(
            cfg.batch_size, cfg.grad_accum, cfg.gradient_checkpointing, world_size=self.placement.world
        )
        candidates = resume_candidates(candidates, stored, same_gpu=stored_gpu == gpu_name)  # a back-off holds
        if not self.placement.device.startswith("cuda"):
            plan = candidates[0]  # a CPU has no memory cliff worth probing; the profile's plan runs as given
        else:
            plan = plan_fit(candidates, self._probe)
        note = describe_replan(stored, plan, stored_gpu, gpu_name) if stored else None
        self.bus.emit(events.Planned(plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing, note or ""))
        return plan

    def _probe(self, plan: Plan) -> ProbeResult:
        """One real optimizer step at this plan on a throwaway copy of the LoRA weights."""
        initial = None
        trainer = None
        try:
            torch.cuda.reset_peak_memory_stats()
            trainer = self._make_trainer(plan)
            initial = {k: v.detach().clone() for k, v in lora_state_dict(self.unet, self.encoders).items()}
            result = trainer.step(trainer.largest_shape_step())  # every other bucket fits if this one does
            peak = torch.cuda.max_memory_allocated() / 2**30
            return ProbeResult(True, peak_gib=peak, step_s=result.seconds)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one; only out-of-memory is an answer
            if not is_oom_error(exc):
                raise
            # The traceback's frames hold the failed step's activations: drop them, or the next plan
            # is probed with the last one's memory still allocated.
            traceback.clear_frames(exc.__traceback__)
            return ProbeResult(False, peak_gib=torch.cuda.max_memory_allocated() / 2**30, error=str(exc)[:200])
        finally:
            if initial is not None:
                load_lora_state_dict(self.unet, initial, self.encoders)
            for module in [self.unet, *(e for _, e in self.encoders.named())] if self.encoders else [self.unet]:
                for param in module.parameters():
                    param.grad = None
            del trainer
            gc.collect()
            torch.cuda.empty_cache()
            log.info(
                "probe %s: %.2f GiB still allocated after cleanup",
                plan.describe(),
                torch.cuda.memory_allocated() / 2**30,
            )

    def _make_trainer(self, plan: Plan) -> Trainer:
        return Trainer(  # the Trainer turns gradient checkpointing on or off as the plan says
            self.profile, self.data, self.unet, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
            gradient_checkpointing=plan.gradient_checkpointing, device=self.placement.device,
            eager_shapes=plan.eager_shapes, text_encoders=self.encoders, compile_state=self.compile_state,
            rank=self.placement.rank, world=self.placement.world, bus=self.bus,
        )  # fmt: skip

    # --- training ------------------------------------------------------------------------

    def restore(self, directory: Path, trainer_meta: dict[str, Any]) -> None:
        self.trainer.load_state(directory, trainer_meta)

    def step(self, step: int) -> StepResult:
        """One optimizer step; an out-of-memory backs off one rung (self.plan changes) and runs it again."""
        while True:  # each pass goes one rung down a finite ladder, or back_off raises
            try:
                return self.trainer.step(step)
            except StepOutOfMemory as exc:
                checkpointing = self.profile.train.gradient_checkpointing
                self.plan = back_off(self.trainer, self.plan, exc, checkpointing=checkpointing, bus=self.bus)

    def step_event(self, step_done: int, result: StepResult) -> events.StepDone:
        used = peak = None
        if self.placement.device.startswith("cuda"):
            used = torch.cuda.memory_allocated() / 2**30
            peak = torch.cuda.max_memory_allocated() / 2**30
        return events.StepDone(
            step=step_done, target=self.profile.train.steps, loss=result.loss, lr=result.lr, step_s=result.seconds,
            grad_norm=result.grad_norm, skipped=result.skipped, vram_used_gib=used, vram_peak_gib=peak,
        )  # fmt: skip

    def validation_loss(self) -> float | None:
        return self.trainer.validation_loss() if self.trainer.val_index else None

    def save_state(self, directory: Path) -> dict[str, Any]:
        return self.trainer.save_state(directory)

    def snapshot_state(self):
        """The training state copied to host memory (runner.train.trainstate.StateSnapshot), to be written later."""
        return self.trainer.snapshot_state()

    def lora_weights(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.unet, self.encoders)


def compile_cache_key_of(placement: Placement) -> str:
    """Where this process's compiled kernels can be reused (runner.train.compiling.compile_cache_key)."""
    from runner.train.compiling import compile_cache_key

    return compile_cache_key(torch.device(placement.device))


def read_lora_file(directory: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a restored checkpoint folder (safetensors, never pickle)."""
    from safetensors.torch import load_file

    return load_file(str(directory / LORA_FILE))


# --- several GPUs ----------------------------------------------------------------------------


def init_distributed(placement: Placement) -> None:
    """Join the process group of a torchrun launch (one process per GPU); no-op on one process."""
    if placement.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if placement.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, timeout=collective_timeout())


def close_distributed() -> None:
    """Leave the process group before the process exits: a gloo or NCCL group left to the interpreter's exit
    can abort the process ("terminate called without an active exception", exit 250) after a clean end."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def collective_timeout(environ: dict[str, str] | None = None):
    """How long a collective may wait: RELAY_COLLECTIVE_TIMEOUT_S seconds when set (tests shorten it to
    show that no rank waits in one for setup work), else torch's default (NCCL's: 10 minutes)."""
    from datetime import timedelta

    value = (os.environ if environ is None else environ).get("RELAY_COLLECTIVE_TIMEOUT_S")
    return timedelta(seconds=float(value)) if value else None


def barrier(placement: Placement) -> None:
    if placement.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def agree(placement: Placement, *flags: bool) -> tuple[bool, ...]:
    """Rank 0's decisions (stop, checkpoint, …), the same on every rank, so all ranks step in lockstep."""
    if placement.world == 1 or not torch.distributed.is_initialized():
        return flags
    device = placement.device if placement.device.startswith("cuda") else "cpu"
    values = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.broadcast(values, src=0)
    return tuple(bool(v) for v in values.tolist())
