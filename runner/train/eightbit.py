"""8-bit frozen text encoders (bitsandbytes): where they can run, and the quantization itself.

Must not: read or write storage, or train.
"""

from __future__ import annotations

import logging

import torch

from runner.errors import ProfileError

log = logging.getLogger(__name__)


def check_8bit_available(device: torch.device) -> None:
    """Raise ProfileError (exit 2, naming lora.text_encoder_8bit) where 8-bit encoders cannot run."""
    if device.type != "cuda":
        raise ProfileError(
            "8-bit text encoders (bitsandbytes) need a CUDA GPU",
            key="lora.text_encoder_8bit",
            hint="set lora.text_encoder_8bit = false (the encoders then stay in fp16 on the GPU, fp32 on CPU)",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ProfileError(
            "8-bit text encoders need bitsandbytes", key="lora.text_encoder_8bit",
            hint="pip install bitsandbytes, or set lora.text_encoder_8bit = false",
        ) from exc  # fmt: skip


def quantize_8bit(encoder: torch.nn.Module, device: torch.device) -> int:
    """Replace the frozen Linear layers of a CLIP encoder's transformer layers by bitsandbytes 8-bit ones
    (LLM.int8, weights quantized when moved to the GPU), before LoRA is attached; returns how many."""
    import bitsandbytes as bnb

    layers = getattr(encoder, "text_model", encoder).encoder.layers  # CLIPTextModel lost text_model in transformers 5
    replaced = 0
    for parent in layers.modules():
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear8bitLt(
                child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
            )
            q.weight = bnb.nn.Int8Params(child.weight.data.to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)  # fmt: skip
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(torch.float16), requires_grad=False)
            setattr(parent, child_name, q.to(device))
            replaced += 1
    encoder.is_loaded_in_8bit = True  # peft then wraps these layers with its bitsandbytes LoRA layer
    return replaced
