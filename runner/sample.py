"""Base-vs-LoRA sample grids, memory-safe on a 16 GB GPU.

Owns: running SDXL inference on already-loaded parts (no second copy of any
weight), drawing each prompt twice with the same seed, once with the LoRA off
and once on (the adapter is toggled, not reloaded), and writing one PNG grid:
rows are prompts, columns base | LoRA.

Memory: the work goes in phases (encode all prompts, denoise, decode) and only
the module of the phase is on the GPU beside the UNet; the VAE decodes sliced
and tiled. With `cpu_offload`, diffusers' model offload places modules instead.

Must not: train, touch storage, or leave the caller's model changed: an adapter
attached or LoRA weights loaded here are removed or restored, modules moved to
the GPU go back where they were, in the dtype they had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from runner.errors import ModelError
from runner.profile import LoraConfig
from runner.train.model import SDXLParts, attach_lora, eager, load_lora_state_dict, lora_state_dict

log = logging.getLogger(__name__)

LABEL_H_PX = 16  # height of the "base" / "LoRA" header row
HEADERS = ("base", "LoRA")


def build_pipeline(parts: SDXLParts, *, text_encoders: bool = True) -> StableDiffusionXLPipeline:
    """A pipeline that shares the modules of `parts` (Euler sampler from the training schedule).

    text_encoders=False: for prompt embeddings computed beforehand; the pipeline then casts them
    to the UNet's dtype (with text encoders it casts to theirs, which breaks fp32 text encoders
    next to an fp16 UNet)."""
    scheduler = EulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder if text_encoders else None,
        text_encoder_2=parts.text_encoder_2 if text_encoders else None,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(
    pipe_parts: SDXLParts, lora_sd: dict[str, torch.Tensor] | None, prompts: Sequence[str], seed: int, steps: int,
    guidance: float, resolution: int, out_path: Path, *, lora_cfg: LoraConfig | None = None, device: str = "cpu",
    cpu_offload: bool = False,
) -> Path:  # fmt: skip
    """Draw each prompt with the LoRA off and on (same seed, seed + row) and save the grid PNG at out_path.

    lora_sd None: use the adapter already attached to the UNet (sampling during training).
    lora_sd given: load it (lora_cfg gives rank/alpha/targets) for the duration of the call.
    cpu_offload: on CUDA, let diffusers keep only the running module on the GPU (standalone `relay sample`).
    """
    if not prompts:
        raise ModelError("no prompts to sample", hint="set sample.prompts in the profile")
    pipe, denoiser = build_pipeline(pipe_parts), build_pipeline(pipe_parts, text_encoders=False)
    offload = cpu_offload and device.startswith("cuda") and torch.cuda.is_available()
    unet = pipe_parts.unet
    with _lora_loaded(unet, lora_sd, lora_cfg), _offloaded(pipe, device, offload), eager(unet):
        with _on(device, offload, pipe_parts.text_encoder, pipe_parts.text_encoder_2):
            embeds = [_encode(pipe, prompt, device, guidance) for prompt in prompts]
        with _on(device, offload, pipe_parts.unet):
            latents = [
                [_denoise(denoiser, e, seed + i, steps, guidance, resolution, lora_on=on) for on in (False, True)]
                for i, e in enumerate(embeds)
            ]
        rows = [[_decode(pipe, x, device) for x in row] for row in latents]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, HEADERS).save(out_path)
    log.info("sample grid (%d prompts) written to %s", len(prompts), out_path)
    return out_path


def _encode(pipe: StableDiffusionXLPipeline, prompt: str, device: str, guidance: float) -> dict[str, torch.Tensor]:
    """Prompt embeddings in the UNet's dtype. The text encoders carry no LoRA: one encoding serves both columns."""
    with torch.no_grad():  # not inference_mode: its tensors must never reach the caller's (trainable) modules
        tensors = pipe.encode_prompt(prompt, device=torch.device(device), do_classifier_free_guidance=guidance > 1)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    dtype = pipe.unet.dtype
    return {name: t.to(dtype) for name, t in zip(names, tensors, strict=True) if t is not None}


def _denoise(pipe: StableDiffusionXLPipeline, embeds: dict[str, torch.Tensor], seed: int, steps: int, guidance: float, resolution: int, *, lora_on: bool) -> torch.Tensor:  # fmt: skip
    if lora_on:
        pipe.unet.enable_adapters()
    else:
        pipe.unet.disable_adapters()
    try:
        generator = torch.Generator("cpu").manual_seed(seed)  # CPU generator: the same noise on every device
        with torch.no_grad():
            return pipe(
                **embeds, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                generator=generator, output_type="latent",
            ).images  # fmt: skip
    finally:
        pipe.unet.enable_adapters()


def _decode(pipe: StableDiffusionXLPipeline, latents: torch.Tensor, device: str) -> Image.Image:
    """Decode sliced and tiled, in the VAE's dtype; an fp16 VAE that needs it runs in fp32 (fp16→fp32→fp16 is exact)."""
    vae = pipe.vae
    home, home_dtype, flags = _device_of(vae), vae.dtype, (vae.use_slicing, vae.use_tiling)
    dtype = torch.float32 if home_dtype == torch.float16 and vae.config.force_upcast else home_dtype
    _move(vae, device, dtype)
    vae.use_slicing, vae.use_tiling = True, True  # the 1024 px decode is the memory peak on a T4
    try:
        with torch.no_grad():
            image = vae.decode(latents.to(device=device, dtype=dtype) / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]
    finally:
        vae.use_slicing, vae.use_tiling = flags  # tiling would change the latents a cache build encodes
        _move(vae, home, home_dtype)
        _free(device)


def _move(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    """Move, casting only when the dtype changes (diffusers warns on every cast)."""
    if module.dtype != dtype:
        module.to(device=device, dtype=dtype)
    else:
        module.to(device)


def _free(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def has_adapter(unet: Any) -> bool:
    return bool(getattr(unet, "peft_config", None))


@contextmanager
def _lora_loaded(unet: Any, lora_sd: dict[str, torch.Tensor] | None, lora_cfg: LoraConfig | None) -> Iterator[None]:
    """Make the UNet carry `lora_sd` for the block; restore what it carried before."""
    if lora_sd is None:
        if not has_adapter(unet):
            raise ModelError("the UNet has no LoRA to sample", hint="pass the LoRA state dict (lora.safetensors)")
        yield
        return
    if lora_cfg is None:
        raise ModelError("sampling a LoRA state dict needs its lora settings", hint="pass lora_cfg=profile.lora")
    attached_here = not has_adapter(unet)
    previous = None if attached_here else lora_state_dict(unet)
    if attached_here:
        attach_lora(unet, lora_cfg)
    try:
        load_lora_state_dict(unet, lora_sd)
        yield
    finally:
        if attached_here:
            unet.delete_adapters(list(unet.peft_config))
        else:
            load_lora_state_dict(unet, previous)


@contextmanager
def _on(device: str, offload: bool, *modules: torch.nn.Module) -> Iterator[None]:
    """Modules on `device` for the block, then back where they were (model offload places them itself)."""
    homes = [_device_of(m) for m in modules]
    if not offload:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if not offload:
            for module, home in zip(modules, homes, strict=True):
                module.to(home)
        _free(device)


@contextmanager
def _offloaded(pipe: StableDiffusionXLPipeline, device: str, offload: bool) -> Iterator[None]:
    """diffusers' model CPU offload for the block; afterwards every module is back where it was."""
    if not offload:
        yield
        return
    homes = {
        name: _device_of(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
    }
    pipe.enable_model_cpu_offload(device=device)
    try:
        yield
    finally:
        pipe.remove_all_hooks()
        for name, home in homes.items():
            getattr(pipe, name).to(home)
        _free(device)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def make_grid(rows: Sequence[Sequence[Image.Image]], headers: Sequence[str]) -> Image.Image:
    """Images in a grid (rows × columns) under a header row of labels."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(headers), LABEL_H_PX + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(headers):
        draw.text((col * width + 4, 2), label, fill="black")
    for r, images in enumerate(rows):
        for col, image in enumerate(images):
            grid.paste(image.convert("RGB"), (col * width, LABEL_H_PX + r * height))
    return grid


def draw_samples(profile: Any, lora_sd: dict | None, out_path: Path, *, device: str, unet: Any = None) -> Path:
    """The base-vs-LoRA grid with the profile's prompts; reuses the training UNet when given."""
    import gc

    from runner.train.model import load_parts
    from runner.train.run import unet_dtype

    dtype = unet_dtype(profile, device)
    parts = load_parts(profile.model, unet=unet is None, text=True, vae=True, device="cpu", dtype=dtype)
    if unet is not None:
        parts.unet = unet
    cfg = profile.sample
    try:
        return sample_grid(
            parts, lora_sd, cfg.prompts, cfg.seed, cfg.inference_steps, cfg.guidance, profile.train.resolution,
            out_path, lora_cfg=profile.lora, device=device, cpu_offload=device.startswith("cuda"),
        )  # fmt: skip
    finally:
        del parts
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
