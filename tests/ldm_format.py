"""A diffusers SDXL UNet's weights laid out as in a single-file checkpoint (A1111 / ComfyUI / the original
repository: keys under `model.diffusion_model.`), so tests can make such a file from the tiny model.

Only the UNet: that is what training loads from the file every session. The layout: `input_blocks.N`
numbers the down path's layers (the conv_in first, then `layers_per_block` layers and a downsampler per
level), `middle_block.0-2` is resnet, attention, resnet, and `output_blocks.N` numbers the up path's
`layers_per_block + 1` layers per level, the upsampler riding in the last layer of a level.
"""

from __future__ import annotations

import re

import torch

PREFIX = "model.diffusion_model."
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
