"""Compiled blocks: whether torch.compile can run here, which train.compile mode a trainer runs (`compile_mode`),
compiling the UNet's blocks, undoing it, the compile cache's key and artifacts, and running compiled blocks
eagerly for a while.

Must not: read or write storage, or train.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from runner.profile import LoraConfig
from runner.train.lora import lora_input_casts

log = logging.getLogger(__name__)


COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
RECOMPILE_LIMIT = 64  # block variants (channel counts, shortcut or not) × aspect buckets
AUTO_COMPILE = "graphs"  # what train.compile = "auto" uses on a CUDA GPU: bench/RESULTS.md says why


@dataclass
class CompileState:
    """Whether torch.compile failed for the trainers that share this object (a TrainingRun's probes and
    its trainer): once it failed, each later one stays eager instead of failing again."""

    broken: str = ""
    """Why torch.compile failed; empty while it has not."""


def compile_available(device: torch.device, state: CompileState | None = None) -> tuple[bool, str]:
    """Whether torch.compile can run here, and why not when it cannot."""
    if state is not None and state.broken:
        return False, f"torch.compile failed earlier in this process ({state.broken})"
    if device.type != "cuda":
        return False, "torch.compile is used on CUDA only (CPU runs stay eager and bit-exact)"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, f"GPU compute capability {major}.x is below the 7.0 that Triton needs"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, ""


def compile_mode(
    wanted: str, lora: LoraConfig, device: torch.device, state: CompileState | None = None
) -> tuple[str | None, str]:
    """The train.compile mode this device can run ("blocks" or "graphs"; None: eager), and a warning for the
    user when that is less than what was asked for by name ("" when nothing to say; "auto" never warns)."""
    if wanted == "off":
        return None, ""
    ok, why = compile_available(device, state)
    if not ok:
        return None, (f"train.compile = {wanted}, but {why}; training eagerly" if wanted != "auto" else "")
    mode, warning = AUTO_COMPILE if wanted == "auto" else wanted, ""
    if mode == "graphs" and lora.text_encoder_8bit and lora.text_encoder:
        if wanted == "graphs":  # bitsandbytes' int8 matmul is not known to be safe inside a capture
            warning = "train.compile = graphs with 8-bit text encoders: compiling blocks only"
        mode = "blocks"
    if mode == "graphs" and lora.dropout > 0:
        if wanted == "graphs":
            warning = "train.compile = graphs needs lora.dropout = 0; compiling blocks only"
        mode = "blocks"
    return mode, warning


def compile_blocks(unet: UNet2DConditionModel) -> int:
    """Regional torch.compile: compile each transformer and ResNet block of the UNet in place.

    A launch-bound step (a fast GPU, or a slow notebook CPU) spends its time issuing ~24,000 small kernels;
    inductor fuses each block's LoRA scale-and-add, norms, activations and casts. Each distinct block is
    compiled once and reused by every instance of it, diffusers' gradient checkpointing stays around the
    blocks, and the state-dict keys do not change. (Compiling the whole UNet with checkpointing traced
    into it did not finish its first step within 280 s on a 16-core host: bench/RESULTS.md.)
    Returns the number of blocks newly compiled; a UNet compiled before is left as it is."""
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), RECOMPILE_LIMIT))
    count = 0
    for module in unet.modules():
        if type(module).__name__ in COMPILED_BLOCKS and getattr(module, "_compiled_call_impl", None) is None:
            module.compile()
            count += 1
    log.info("torch.compile: %d UNet blocks, compiled on first use", count)
    return count


def uncompile(unet: UNet2DConditionModel, reason: str, state: CompileState | None = None) -> None:
    """Undo compile_blocks after torch.compile failed, and keep the later trainers sharing `state` eager."""
    if state is not None:
        state.broken = reason[:200]
    for module in unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def compile_cache_key(device: torch.device) -> str:
    """Where compiled kernels can be reused: the same torch, Triton and GPU model."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    raw = f"torch-{torch.__version__}-triton-{triton_version}-{gpu}"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in raw)


def has_compile_cache_api() -> bool:
    """torch.compiler.save_cache_artifacts / load_cache_artifacts exist from torch 2.7; pyproject allows older."""
    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def _no_compile_cache_api() -> bool:
    if has_compile_cache_api():
        return False
    log.info("torch %s has no compile-cache API (torch 2.7+): compiled kernels are not kept across sessions",
             torch.__version__)  # fmt: skip
    return True


def compile_artifacts() -> bytes | None:
    """What torch.compile produced in this process (kernels, graphs), serialized; None when nothing
    (or when this torch cannot serialize them)."""
    if _no_compile_cache_api():
        return None
    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved else None


def load_compile_artifacts(blob: bytes) -> None:
    """Seed this process's compile caches with `compile_artifacts` of an earlier session (a no-op,
    logged, on a torch without the API: the first step compiles)."""
    if _no_compile_cache_api():
        return
    torch.compiler.load_cache_artifacts(blob)


@contextmanager
def eager(unet: UNet2DConditionModel) -> Iterator[None]:
    """Run compiled blocks eagerly for the duration (sampling, FLOP counting), with peft's input casts on."""
    stance = getattr(torch.compiler, "set_stance", None)
    with lora_input_casts(unet), stance("force_eager") if stance else nullcontext():
        yield
