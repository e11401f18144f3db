"""Base-vs-LoRA sample grids, memory-safe on a 16 GB GPU.

Owns: running SDXL inference on already-loaded parts (no second copy of any
weight), drawing each prompt twice with the same seed, once with the LoRA off
and once on (the adapter is toggled, not reloaded), and writing one PNG grid:
rows are prompts (each labelled with its prompt on the left), columns base |
LoRA under a header that names the step (drawn by runner.samplegrid). When the LoRA trained the text
encoders too, each column encodes its prompt with its own encoders (base, or
with their LoRA).

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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from runner.errors import ModelError, UsageError
from runner.profile import LoraConfig
from runner.samplegrid import HEADERS, make_grid
from runner.train.compiling import eager
from runner.train.lora import (
    TEXT_ENCODER_NAMES,
    TextEncoders,
    attach_lora,
    attach_text_encoder_lora,
    detach_text_encoder_lora,
    has_lora,
    lora_input_casts,
    lora_state_dict,
    set_adapters_enabled,
    split_lora_state,
)
from runner.train.model import SDXLParts

log = logging.getLogger(__name__)


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
    cpu_offload: bool = False, step: int | None = None,
) -> Path:  # fmt: skip
    """Draw each prompt with the LoRA off and on (same seed, seed + row) and save the grid PNG at out_path.

    lora_sd None: use the adapters already attached to the UNet and, if any, the text encoders (during training).
    lora_sd given: load it (lora_cfg gives rank/alpha/targets), text-encoder weights included, for the call.
    cpu_offload: on CUDA, let diffusers keep only the running module on the GPU (standalone `relay sample`).
    step: the optimizer step of the LoRA, named in the header ("LoRA · step 120").
    """
    rows = prompt_images(pipe_parts, lora_sd, prompts, seed, steps, guidance, resolution, lora_cfg=lora_cfg,
                         device=device, cpu_offload=cpu_offload)  # fmt: skip
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, HEADERS, prompts, step=step).save(out_path)
    log.info("sample grid (%d prompts) written to %s", len(prompts), out_path)
    return out_path


def prompt_images(
    pipe_parts: SDXLParts, lora_sd: dict[str, torch.Tensor] | None, prompts: Sequence[str], seed: int, steps: int,
    guidance: float, resolution: int, *, lora_cfg: LoraConfig | None = None, device: str = "cpu",
    cpu_offload: bool = False,
) -> list[list[Image.Image]]:  # fmt: skip
    """[base, LoRA] images of each prompt (seed + row), as sample_grid draws them (`relay compare` too)."""
    if not prompts:
        raise ModelError("no prompts to sample", hint="set sample.prompts in the profile")
    pipe, denoiser = build_pipeline(pipe_parts), build_pipeline(pipe_parts, text_encoders=False)
    offload = cpu_offload and device.startswith("cuda") and torch.cuda.is_available()
    unet = pipe_parts.unet
    encoders = TextEncoders(pipe_parts.text_encoder, pipe_parts.text_encoder_2)
    with _lora_loaded(unet, encoders, lora_sd, lora_cfg), _offloaded(pipe, device, offload), eager(unet):
        with _on(device, offload, *(e for _, e in encoders.named())), _encoding(encoders):
            embeds = [_encode_both(pipe, encoders, prompt, device, guidance) for prompt in prompts]
        with _on(device, offload, pipe_parts.unet):
            latents = [
                [_denoise(denoiser, e[on], seed + i, steps, guidance, resolution, lora_on=on) for on in (False, True)]
                for i, e in enumerate(embeds)
            ]
        return [[_decode(pipe, x, device) for x in row] for row in latents]


def _encode_both(
    pipe: StableDiffusionXLPipeline, encoders: TextEncoders, prompt: str, device: str, guidance: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, LoRA) prompt embeddings: encoded twice, LoRA off then on, when the text encoders carry LoRA; else
    one encoding serves both columns."""
    if not any(has_lora(e) for _, e in encoders.named()):
        embeds = _encode(pipe, prompt, device, guidance)
        return embeds, embeds
    out = []
    for on in (False, True):
        for _, encoder in encoders.named():
            set_adapters_enabled(encoder, on)
        out.append(_encode(pipe, prompt, device, guidance))
    return out[0], out[1]


@contextmanager
def _encoding(encoders: TextEncoders) -> Iterator[None]:
    """Encoders in eval mode with peft's input casts on (an fp16 encoder with fp32 LoRA, without autocast);
    afterwards their mode, casts and adapters as they were (adapters on)."""
    modes = [e.training for _, e in encoders.named()]
    with lora_input_casts(encoders.text_encoder), lora_input_casts(encoders.text_encoder_2):
        try:
            for _, encoder in encoders.named():
                encoder.eval()
            yield
        finally:
            for (_, encoder), mode in zip(encoders.named(), modes, strict=True):
                set_adapters_enabled(encoder, True)
                encoder.train(mode)


def _encode(pipe: StableDiffusionXLPipeline, prompt: str, device: str, guidance: float) -> dict[str, torch.Tensor]:
    """Prompt embeddings in the UNet's dtype."""
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
def _lora_loaded(
    unet: Any, encoders: TextEncoders, lora_sd: dict[str, torch.Tensor] | None, lora_cfg: LoraConfig | None
) -> Iterator[None]:
    """Make the UNet (and the text encoders, for a LoRA that trained them) carry `lora_sd` for the block;
    restore what they carried before. A part `lora_sd` lacks (all of it when None) must be attached already."""
    parts = split_lora_state(lora_sd or {})
    if "unet" not in parts and not has_adapter(unet):
        raise ModelError("the UNet has no LoRA to sample", hint="pass the LoRA state dict (lora.safetensors)")
    if parts and lora_cfg is None:
        raise ModelError("sampling a LoRA state dict needs its lora settings", hint="pass lora_cfg=profile.lora")
    unet_lora = _unet_lora(unet, parts["unet"], lora_cfg) if "unet" in parts else nullcontext()
    with unet_lora, _text_lora(encoders, parts, lora_cfg):
        yield


@contextmanager
def _unet_lora(unet: Any, state: dict[str, torch.Tensor], lora_cfg: LoraConfig) -> Iterator[None]:
    from peft.utils import set_peft_model_state_dict

    attached_here = not has_adapter(unet)
    previous = None if attached_here else _copied(lora_state_dict(unet))
    if attached_here:
        attach_lora(unet, lora_cfg)
    try:
        _load_exactly(unet, state, set_peft_model_state_dict)
        yield
    finally:
        if attached_here:
            unet.delete_adapters(list(unet.peft_config))
        else:
            set_peft_model_state_dict(unet, previous)


@contextmanager
def _text_lora(
    encoders: TextEncoders, parts: dict[str, dict[str, torch.Tensor]], lora_cfg: LoraConfig
) -> Iterator[None]:
    """The text encoders' part of a LoRA, when it has one, on the encoders for the block."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if not any(name in parts for name in TEXT_ENCODER_NAMES):
        yield
        return
    attached_here = not any(has_lora(e) for _, e in encoders.named())
    previous = None if attached_here else [_copied(get_peft_model_state_dict(e)) for _, e in encoders.named()]
    if attached_here:
        attach_text_encoder_lora(encoders, lora_cfg)
    try:
        for name, encoder in encoders.named():
            _load_exactly(encoder, parts.get(name, {}), set_peft_model_state_dict)
        yield
    finally:
        if attached_here:
            detach_text_encoder_lora(encoders)
        else:
            for (_, encoder), state in zip(encoders.named(), previous, strict=True):
                set_peft_model_state_dict(encoder, state)


def _copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies: a state dict of CPU weights shares their memory, so loading other weights would change it too."""
    return {key: value.detach().clone() for key, value in state.items()}


def _load_exactly(module: Any, state: dict[str, torch.Tensor], load: Any) -> None:
    from peft.utils import get_peft_model_state_dict

    expected, given = set(get_peft_model_state_dict(module)), set(state)
    if expected != given:
        raise ModelError(
            f"LoRA weights do not match the model: missing {sorted(expected - given)[:3]}, "
            f"unexpected {sorted(given - expected)[:3]}",
            hint="the checkpoint was trained with other lora settings; use the run's profile",
        )
    load(module, state)


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


def ensure_writable(out_path: Path, flag: str = "--out") -> Path:
    """`out_path`'s folder, created if needed, or a UsageError (exit 2) naming the flag and the path.

    For the `relay sample --out` command, before any model loads; during training a failed sample is
    only a warning, so sample_grid itself raises the plain OSError."""
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        probe = out_path.parent / f".{out_path.name}.relay-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {out_path}: cannot write there ({exc.strerror or exc})",
                         hint="choose a folder that exists and that you can write to") from None  # fmt: skip
    return out_path


def draw_samples(
    profile: Any, lora_sd: dict | None, out_path: Path, *, device: str, unet: Any = None,
    text_encoders: Any = None, step: int | None = None,
) -> Path:  # fmt: skip
    """The base-vs-LoRA grid with the profile's prompts; reuses the training UNet (and text encoders) when given.

    step: the LoRA's optimizer step, named in the grid's header."""
    import gc

    from runner.train.loading import load_parts
    from runner.train.run import unet_dtype

    dtype = unet_dtype(profile, device)
    parts = load_parts(
        profile.model, unet=unet is None, text=text_encoders is None, vae=True, device="cpu", dtype=dtype
    )
    if unet is not None:
        parts.unet = unet
    if text_encoders is not None:
        parts.text_encoder, parts.text_encoder_2 = text_encoders.text_encoder, text_encoders.text_encoder_2
        parts.tokenizer, parts.tokenizer_2 = text_encoders.tokenizer, text_encoders.tokenizer_2
    cfg = profile.sample
    try:
        return sample_grid(
            parts, lora_sd, cfg.prompts, cfg.seed, cfg.inference_steps, cfg.guidance, profile.train.resolution,
            out_path, lora_cfg=profile.lora, device=device, cpu_offload=device.startswith("cuda"), step=step,
        )  # fmt: skip
    finally:
        del parts
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
