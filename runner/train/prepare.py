"""Getting the models ready to train: the precision (decided here once), the LoRA attached and seeded, the
frozen weights in that precision (the text encoders' optionally 8-bit) on the device, the memory layout,
gradient checkpointing, and the UNet's blocks compiled when the compile mode says so.

Must not: run a step, know the optimizer, storage or events (the Trainer warns); draw from the caller's
RNG (LoRA init is seeded from the profile's seed alone, under a forked RNG).
"""

from __future__ import annotations

from typing import Any

import torch

from runner.errors import ModelError
from runner.profile import LoraConfig
from runner.train.compiling import compile_blocks
from runner.train.eightbit import check_8bit_available, quantize_8bit
from runner.train.graphs import checkpoint_without_rng
from runner.train.lora import (
    TextEncoders,
    attach_lora,
    attach_text_encoder_lora,
    has_lora,
    lora_parameters,
    set_lora_input_casts,
)
from runner.train.seeds import LORA_INIT_TAG, TEXT_LORA_INIT_TAG, derive_seed

BF16_CAPABILITY = (8, 0)  # Ampere and later run bf16 natively
CHANNELS_LAST = False  # CUDA: the UNet's convolutions in NHWC, as tensor cores (a T4's too) run them: no layout
# transposes around each cuDNN call. Off until a whole step is measured with it (bench/RESULTS.md, 2026-12-07: the
# convolutions alone ran 1.3-3x faster, but its first compile outran 180 s). CPU runs always keep NCHW.


def has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself. Not torch.cuda.is_bf16_supported(): that also counts
    emulation and says True on a T4 (sm_75), where bf16 runs slower than fp16."""
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


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen weights (and of autocast) at a resolved precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def uses_channels_last(device: torch.device) -> bool:
    """Whether the UNet runs in NHWC on this device (CHANNELS_LAST, CUDA only)."""
    return CHANNELS_LAST and device.type == "cuda"


def set_gradient_checkpointing(unet: Any, enabled: bool, compiled: str | None) -> None:
    """Turn the UNet's gradient checkpointing on or off. Under CUDA graphs it saves no RNG state (the capture
    forbids it, and nothing in a captured step draws any)."""
    if enabled:
        unet.enable_gradient_checkpointing(checkpoint_without_rng if compiled == "graphs" else None)
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()  # a UNet reused after a probe at another plan


def prepare_unet(
    unet: Any,
    lora: LoraConfig,
    *,
    seed: int,
    precision: str,
    device: torch.device,
    compiled: str | None,
    gradient_checkpointing: bool,
) -> None:
    """LoRA on the UNet (attached once, seeded), its frozen weights at the precision's dtype on `device`,
    checkpointing as asked, its blocks compiled when `compiled`; in train mode."""
    if not lora_parameters(unet):
        with torch.random.fork_rng(devices=[]):  # LoRA init must not depend on the caller's RNG
            torch.manual_seed(derive_seed(seed, LORA_INIT_TAG))
            attach_lora(unet, lora)
    dtype = weight_dtype(precision)
    if unet.dtype != dtype:
        unet.to(dtype=dtype)
    unet.to(device)
    if uses_channels_last(device):
        unet.to(memory_format=torch.channels_last)  # the 4-D (conv) weights; LoRA's are made dense again below
    for param in lora_parameters(unet):
        # LoRA weights stay fp32 whatever the UNet's dtype, and dense in their own order (a conv LoRA's too):
        # their .grad views of the flat buffer and the fused AdamW read them element by element
        param.data = param.data.float().contiguous()
    set_gradient_checkpointing(unet, gradient_checkpointing, compiled)
    set_lora_input_casts(unet, enabled=precision == "fp32")  # autocast picks the matmul dtype
    if compiled:
        compile_blocks(unet)
    unet.train()


def prepare_text_encoders(
    encoders: TextEncoders | None,
    lora: LoraConfig,
    *,
    seed: int,
    precision: str,
    device: torch.device,
    has_token_ids: bool,
) -> None:
    """LoRA on both text encoders (seeded like the UNet's), frozen weights in the UNet's dtype or 8-bit; nothing
    when lora.text_encoder is off. Raises ModelError without encoders, or without cached token ids."""
    if not lora.text_encoder:
        return
    if encoders is None:
        raise ModelError("lora.text_encoder = true, but the trainer was given no text encoders")
    if not has_token_ids:
        raise ModelError(
            "the latent cache has no caption token ids, which training the text encoders needs",
            hint="delete the run's cache/ folder so it is built again",
        )
    if lora.text_encoder_8bit:
        check_8bit_available(device)
    dtype = weight_dtype(precision)
    for _, encoder in encoders.named():
        if has_lora(encoder):
            continue
        if encoder.dtype != dtype:
            encoder.to(dtype=dtype)
        if lora.text_encoder_8bit:
            quantize_8bit(encoder, device)
    if not any(has_lora(e) for _, e in encoders.named()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, TEXT_LORA_INIT_TAG))
            attach_text_encoder_lora(encoders, lora)
    for _, encoder in encoders.named():
        encoder.to(device)
        for param in lora_parameters(encoder):
            param.data = param.data.float()
        set_lora_input_casts(encoder, enabled=precision == "fp32")
        encoder.train()
