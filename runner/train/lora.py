"""LoRA through peft: attaching it to the UNet and the text encoders, the text conditioning the encoders give,
peft's input casts, and moving LoRA weights in and out (state dicts, counts, the forward order).

Must not: read or write storage, or train.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from runner.errors import ModelError
from runner.profile import LoraConfig
from runner.train.model import (
    LORA_MARK,
    bundled_config,
)

log = logging.getLogger(__name__)


# --- LoRA ----------------------------------------------------------------------------------


def peft_config(lora_cfg: LoraConfig) -> Any:
    """The peft LoraConfig for the profile's [lora] section."""
    import peft

    return peft.LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.targets),
        init_lora_weights="gaussian" if lora_cfg.init == "gaussian" else True,
        use_dora=lora_cfg.dora,
    )


def attach_lora(unet: UNet2DConditionModel, lora_cfg: LoraConfig) -> int:
    """Freeze the UNet, add a LoRA adapter (fp32 parameters) and return the trainable parameter count."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(peft_config(lora_cfg))
    except ValueError as exc:
        raise ModelError(
            f"lora.targets {list(lora_cfg.targets)} do not match the UNet's modules: {exc}",
            hint='use attention projections such as ["to_q", "to_k", "to_v", "to_out.0"]',
        ) from exc
    count = _train_lora_params(unet)
    log.info("LoRA attached: %d trainable parameters", count)
    return count


def _train_lora_params(module: torch.nn.Module) -> int:
    """Mark a module's LoRA parameters trainable and fp32; return their count."""
    count = 0
    for name, param in module.named_parameters():
        if LORA_MARK in name:
            param.requires_grad_(True)
            if param.device.type != "meta":
                param.data = param.data.float()
            count += param.numel()
    return count


# --- text-encoder LoRA ------------------------------------------------------------------------

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # also the key prefixes of their LoRA weights


@dataclass
class TextEncoders:
    """The two CLIP text encoders whose LoRA is trained with the UNet's (CLIP-L, CLIP-G with projection)."""

    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any = None  # their tokenizers, for sampling with them (training reads cached token ids)
    tokenizer_2: Any = None

    def named(self) -> list[tuple[str, Any]]:
        """(key prefix, module) of each encoder, in a fixed order."""
        return [(TEXT_ENCODER_NAMES[0], self.text_encoder), (TEXT_ENCODER_NAMES[1], self.text_encoder_2)]


def text_encoder_peft_config(lora_cfg: LoraConfig) -> Any:
    """The peft LoraConfig of the text encoders: their own rank, alpha and targets; dropout, init and DoRA
    as the UNet's."""
    import peft

    return peft.LoraConfig(
        r=lora_cfg.text_encoder_rank or lora_cfg.rank,
        lora_alpha=lora_cfg.text_encoder_alpha or lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.text_encoder_targets),
        init_lora_weights="gaussian" if lora_cfg.init == "gaussian" else True,
        use_dora=lora_cfg.dora,
    )


def attach_text_encoder_lora(encoders: TextEncoders, lora_cfg: LoraConfig) -> int:
    """Freeze both text encoders, add a LoRA adapter to each (fp32 parameters); the trainable count.

    Through peft directly: transformers' own add_adapter asks for a newer peft than any released one."""
    from peft import inject_adapter_in_model

    count = 0
    for name, encoder in encoders.named():
        encoder.requires_grad_(False)
        try:
            inject_adapter_in_model(text_encoder_peft_config(lora_cfg), encoder)
        except ValueError as exc:
            raise ModelError(
                f"lora.text_encoder_targets {list(lora_cfg.text_encoder_targets)} do not match {name}: {exc}",
                hint='use CLIP module names such as ["q_proj", "k_proj", "v_proj", "out_proj"]',
            ) from exc
        count += _train_lora_params(encoder)
    log.info("text-encoder LoRA attached: %d trainable parameters", count)
    return count


def has_lora(module: Any) -> bool:
    return any(LORA_MARK in name for name, _ in module.named_parameters())


def set_adapters_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Turn every LoRA layer of a module on or off (the base weights alone when off)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def detach_text_encoder_lora(encoders: TextEncoders) -> None:
    """Remove the LoRA weights attach_text_encoder_lora added: each wrapped layer then runs its base layer alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for _, encoder in encoders.named():
        for layer in encoder.modules():
            if isinstance(layer, BaseTunerLayer):
                for name in list(layer.active_adapters):
                    layer.delete_adapter(name)
        if hasattr(encoder, "peft_config"):
            del encoder.peft_config


def text_conditioning(
    encoders: TextEncoders, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning from token ids: ([B, 77, D1+D2] penultimate hidden states of both encoders,
    [B, P] pooled projection of the second). The cache's embeddings are computed by the same function."""
    first = encoders.text_encoder(ids, output_hidden_states=True)
    second = encoders.text_encoder_2(ids_2, output_hidden_states=True)
    prompt = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return prompt, second[0]  # text_embeds of CLIPTextModelWithProjection


def set_lora_input_casts(unet: UNet2DConditionModel, enabled: bool) -> None:
    """Turn peft's cast of each LoRA layer's input to the LoRA weights' dtype (fp32) on or off.

    Under autocast the cast is wasted work: autocast casts the input straight back to fp16/bf16 for the
    matmul (the values are identical either way), and the two copies cost four kernel launches per LoRA
    layer per forward and backward, 560 layers on SDXL. Code that runs the UNet without autocast
    (sampling an fp16 UNet with fp32 LoRA weights) needs the cast: see `lora_input_casts`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


@contextmanager
def lora_input_casts(unet: UNet2DConditionModel) -> Iterator[None]:
    """peft's LoRA input casts on for the duration (a UNet run without autocast), then as they were."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    set_lora_input_casts(unet, True)
    try:
        yield
    finally:
        for module, value in zip(layers, before, strict=True):
            module.cast_input_dtype_enabled = value


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of a UNet or text encoder, in a stable (module) order."""
    return [p for name, p in module.named_parameters() if LORA_MARK in name]


# The UNet's top-level parts in the order its forward runs them; named_parameters() lists up_blocks before
# mid_block (the order UNet2DConditionModel registers them), which is not the order gradients appear in.
FORWARD_ORDER = ("conv_in", "time_", "add_", "encoder_hid", "down_blocks", "mid_block", "up_blocks")


def lora_forward_order(unet: UNet2DConditionModel) -> list[int]:
    """Indices into lora_parameters(unet), in the order the forward pass uses them (so the backward
    finishes their gradients in the reverse order)."""
    names = [name for name, _ in unet.named_parameters() if LORA_MARK in name]

    def part(index: int) -> int:
        top = names[index]
        return next((k for k, prefix in enumerate(FORWARD_ORDER) if top.startswith(prefix)), len(FORWARD_ORDER))

    return sorted(range(len(names)), key=lambda index: (part(index), index))


def lora_tensors(unet: UNet2DConditionModel, encoders: TextEncoders | None = None) -> dict[str, torch.Tensor]:
    """The live LoRA tensors (not copies): the UNet's under their peft keys, each text encoder's under its
    prefix ("text_encoder.", "text_encoder_2."), the layout of lora.safetensors."""
    from peft.utils import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(unet))
    for prefix, encoder in encoders.named() if encoders is not None else ():
        state.update({f"{prefix}.{key}": value for key, value in get_peft_model_state_dict(encoder).items()})
    return state


def lora_state_dict(unet: UNet2DConditionModel, encoders: TextEncoders | None = None) -> dict[str, torch.Tensor]:
    """`lora_tensors` copied to CPU, contiguous."""
    return {key: value.detach().to("cpu").contiguous() for key, value in lora_tensors(unet, encoders).items()}


def split_lora_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": …, "text_encoder": …, "text_encoder_2": …} with the prefixes removed; absent parts are left out."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part = next((n for n in reversed(TEXT_ENCODER_NAMES) if key.startswith(n + ".")), "unet")
        parts.setdefault(part, {})[key[len(part) + 1 :] if part != "unet" else key] = value
    return parts


def load_lora_state_dict(
    unet: UNet2DConditionModel, state: dict[str, torch.Tensor], encoders: TextEncoders | None = None
) -> None:
    """Load a state dict from `lora_state_dict` into a UNet (and encoders) that already have the same adapters.

    Raises ModelError when keys do not match (a LoRA from another rank or target list, or one with or
    without text-encoder weights)."""
    from peft.utils import set_peft_model_state_dict

    expected = set(get_lora_keys(unet, encoders))
    given = set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given)[:3], sorted(given - expected)[:3]
        raise ModelError(
            f"LoRA weights do not match the model: missing {missing}, unexpected {unexpected}",
            hint="the checkpoint was trained with other lora.rank / lora.targets / lora.text_encoder; "
            "use the run's profile",
        )
    parts = split_lora_state(state)
    set_peft_model_state_dict(unet, parts.get("unet", {}))
    for prefix, encoder in encoders.named() if encoders is not None else ():
        set_peft_model_state_dict(encoder, parts.get(prefix, {}))


def get_lora_keys(unet: UNet2DConditionModel, encoders: TextEncoders | None = None) -> list[str]:
    return list(lora_tensors(unet, encoders))


def count_lora_params(lora_cfg: LoraConfig) -> int:
    """Trainable LoRA parameters on the full SDXL base 1.0 UNet, computed on the meta device (no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(bundled_config("unet"))
        return attach_lora(unet, lora_cfg)
