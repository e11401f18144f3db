"""Diffusers SDXL weights laid out as in a single-file checkpoint (A1111 / ComfyUI / the original
repository), so tests can make such a file from the tiny model.

The UNet (keys under `model.diffusion_model.`): `input_blocks.N` numbers the down path's layers (the
conv_in first, then `layers_per_block` layers and a downsampler per level), `middle_block.0-2` is
resnet, attention, resnet, and `output_blocks.N` numbers the up path's `layers_per_block + 1` layers per
level, the upsampler riding in the last layer of a level.

The VAE (keys under `first_stage_model.`): `down.N.block.M` / `up.N.block.M` (the decoder's levels
numbered from the bottom, the reverse of diffusers' order), `mid.block_1`, `mid.attn_1`, `mid.block_2`,
and the attention's projections stored as 1×1 convolutions.

The text encoders are left out: diffusers reads them from such a file with SDXL's files from the hub.
"""

from __future__ import annotations

import re

import torch

PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def unet_to_single_file(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """`state` (a diffusers UNet2DConditionModel state dict) under the single-file key names."""
    with_attention = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == "up_blocks"
                      and m.group(3) == "attentions"}  # fmt: skip
    return {PREFIX + _key(key, layers_per_block, with_attention): value for key, value in state.items()}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _key(key: str, per_level: int, up_with_attention: set[int]) -> str:
    module, _, param = key.rpartition(".")
    if module in _FIXED:
        return f"{_FIXED[module]}.{param}"
    if m := _MID.match(key):
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * index}.{_resnet(rest)}"
    m = _BLOCK.match(key)
    if m is None:
        raise KeyError(f"no single-file name for UNet key {key}")
    path, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if path == "down_blocks":
        if kind == "downsamplers":  # "conv.weight" → "op.weight", in the layer after the level's last one
            return f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.{rest.split('.', 1)[1]}"
        layer = level * (per_level + 1) + index + 1
        return f"input_blocks.{layer}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{layer}.1.{rest}"
    if kind == "upsamplers":
        slot = 2 if level in up_with_attention else 1
        return f"output_blocks.{level * (per_level + 1) + per_level}.{slot}.{rest}"
    layer = level * (per_level + 1) + index
    return f"output_blocks.{layer}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{layer}.1.{rest}"


_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_BLOCK = re.compile(
    r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def vae_to_single_file(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """`state` (a diffusers AutoencoderKL state dict with `levels` block levels) under the single-file names."""
    out = {}
    for key, value in state.items():
        name = _vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # stored as 1×1 convolutions
        out[VAE_PREFIX + name] = value
    return out


def _vae_key(key: str, levels: int) -> str:
    if m := _VAE_MID.match(key):
        part, kind, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "resnets":
            return f"{part}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        module, _, param = rest.rpartition(".")
        return f"{part}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
    if m := _VAE_BLOCK.match(key):
        part, path, level, kind, index, rest = m.groups()
        level = int(level) if path == "down_blocks" else levels - 1 - int(level)
        side = "down" if path == "down_blocks" else "up"
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    head, _, tail = key.partition(".")
    module, _, param = tail.rpartition(".")
    if head in ("encoder", "decoder"):
        return f"{head}.{_VAE_FIXED.get(module, module)}.{param}"
    return key  # quant_conv, post_quant_conv
