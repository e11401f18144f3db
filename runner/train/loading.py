"""Loading the SDXL components (UNet, VAE, both CLIP text encoders, both tokenizers) from a hub id, a local
diffusers folder or a single-file checkpoint, or from the builders of `testmodels`.

Must not: read or write storage, train, or touch the data. Loading never holds two copies of the UNet in
memory: weights go straight to the target device in the target dtype (low_cpu_mem_usage).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from runner.errors import ModelError
from runner.profile import ModelConfig
from runner.train.model import (
    CONFIGS_DIR,
    SDXL_RANDOM,
    TINY,
    SDXLParts,
    training_scheduler,
)
from runner.train.testmodels import build_random_sdxl, build_tiny, build_tokenizer

log = logging.getLogger(__name__)


# --- loading -------------------------------------------------------------------------------


def load_parts(
    model_cfg: ModelConfig,
    *,
    unet: bool = True,
    text: bool = True,
    vae: bool = True,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> SDXLParts:
    """Load the requested SDXL pieces of `model_cfg.base` (+ `model_cfg.vae`); pieces not asked for are None.

    Raises ModelError naming the path or hub id that failed and what to check."""
    base = model_cfg.base
    if base == TINY:
        parts = build_tiny()
        parts = _select(parts, unet=unet, text=text, vae=vae)
        return _to(parts, device, dtype)
    if base == SDXL_RANDOM:
        return build_random_sdxl(unet=unet, text=text, vae=vae, device=device, dtype=dtype)
    if base.endswith((".safetensors", ".ckpt")):
        parts = _load_single_file(base, unet=unet, text=text, vae=vae and not model_cfg.vae, dtype=dtype)
    else:
        parts = _load_pretrained(model_cfg, unet=unet, text=text, vae=vae and not model_cfg.vae, dtype=dtype)
    if vae and model_cfg.vae:
        parts.vae = _guarded(model_cfg.vae, lambda: _load_vae(model_cfg.vae, model_cfg, dtype))
    parts.noise_scheduler = training_scheduler()
    return _to(parts, device, None)


def _select(parts: SDXLParts, *, unet: bool, text: bool, vae: bool) -> SDXLParts:
    return SDXLParts(
        unet=parts.unet if unet else None,
        vae=parts.vae if vae else None,
        text_encoder=parts.text_encoder if text else None,
        text_encoder_2=parts.text_encoder_2 if text else None,
        tokenizer=parts.tokenizer if text else None,
        tokenizer_2=parts.tokenizer_2 if text else None,
        noise_scheduler=parts.noise_scheduler,
    )


def _to(parts: SDXLParts, device: str, dtype: torch.dtype | None) -> SDXLParts:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(parts, name)
        if module is None:
            continue
        if dtype is None or dtype == module.dtype:
            module.to(device)
        else:
            module.to(device=device, dtype=dtype)
    return parts


def _guarded(where: str, load: Any) -> Any:
    """Run a loader, turning library errors into a ModelError that says what to check."""
    try:
        return load()
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"cannot load model weights from {where!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check the path or hub id in [model]; for a gated or private hub model set HF_TOKEN; "
            "offline, point model.base at a local diffusers folder or .safetensors file",
        ) from exc


def _hub_kwargs(model_cfg: ModelConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"low_cpu_mem_usage": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    return kwargs


FP16_VARIANT = "fp16"
"""SDXL base 1.0 ships `*.fp16.safetensors` beside its fp32 files: UNet 5.1 GB instead of 10.3 GB."""


def download_variant(model_cfg: ModelConfig, dtype: torch.dtype | None) -> tuple[str | None, bool]:
    """(variant to download, whether it may fall back to the default files).

    `model.variant` when the profile sets one (no fallback: the user asked for it). Otherwise the
    fp16 files when the weights end up in fp16 anyway: casting fp32 files to fp16 gives the same
    numbers at twice the download. Not for bf16 (fp16 then bf16 rounds twice and would change the
    frozen weights of runs started from the fp32 files). A download detail: it never enters the
    profile fingerprint, so runs started before it existed still resume."""
    if model_cfg.variant:
        return model_cfg.variant, False
    return (FP16_VARIANT, True) if dtype == torch.float16 else (None, False)


def _has_variant_files(folder: Path, variant: str) -> bool:
    return (
        any(folder.glob(f"*.{variant}.safetensors"))
        or any(folder.glob(f"*.{variant}.bin"))
        or any(folder.glob(f"*.{variant}.safetensors.index.json"))
    )


def _is_missing_variant(exc: OSError, variant: str) -> bool:
    """diffusers (utils/hub_utils.py _get_model_file) and transformers (modeling_utils.py) raise OSError
    "… does not appear to have a file named X.<variant>.…" for a hub repo, "Error no file named …" for a
    folder; a connection error says neither."""
    text = str(exc)
    return f".{variant}." in text and ("does not appear to have a file named" in text or "no file named" in text)


def _from_pretrained(loader: Any, base: str, subfolder: str, kwargs: dict[str, Any], variant: tuple[str | None, bool]):
    """`loader.from_pretrained` of one component, in `variant` when it has one (see download_variant)."""
    name, may_fall_back = variant
    if name and may_fall_back and Path(base).is_dir() and not _has_variant_files(Path(base) / subfolder, name):
        name = None  # a local folder without the variant: nothing to try
    if not name:
        return loader.from_pretrained(base, subfolder=subfolder, **kwargs)
    try:
        return loader.from_pretrained(base, subfolder=subfolder, variant=name, **kwargs)
    except OSError as exc:
        if not (may_fall_back and _is_missing_variant(exc, name)):
            raise
    log.info("%s/%s has no %s weights: loading its default files", base, subfolder, name)
    return loader.from_pretrained(base, subfolder=subfolder, **kwargs)


def _load_pretrained(
    model_cfg: ModelConfig, *, unet: bool, text: bool, vae: bool, dtype: torch.dtype | None
) -> SDXLParts:
    base = model_cfg.base
    kwargs = _hub_kwargs(model_cfg, dtype)
    variant = download_variant(model_cfg, dtype)
    # the stock VAE is upcast to fp32 to encode (it overflows in fp16): its fp32 files, unless asked otherwise
    vae_variant = (model_cfg.variant or None, False)
    revision = {"revision": model_cfg.revision} if model_cfg.revision else {}
    parts = SDXLParts()
    if unet:
        parts.unet = _guarded(base, lambda: _from_pretrained(UNet2DConditionModel, base, "unet", kwargs, variant))
    if vae:
        parts.vae = _guarded(base, lambda: _from_pretrained(AutoencoderKL, base, "vae", kwargs, vae_variant))
    if text:
        parts.text_encoder = _guarded(
            base, lambda: _from_pretrained(CLIPTextModel, base, "text_encoder", kwargs, variant)
        )
        parts.text_encoder_2 = _guarded(
            base, lambda: _from_pretrained(CLIPTextModelWithProjection, base, "text_encoder_2", kwargs, variant)
        )
        parts.tokenizer = _guarded(base, lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **revision))
        parts.tokenizer_2 = _guarded(
            base, lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **revision)
        )
    return parts


def _load_vae(name: str, model_cfg: ModelConfig, dtype: torch.dtype | None) -> AutoencoderKL:
    kwargs: dict[str, Any] = {"low_cpu_mem_usage": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if name.endswith(".safetensors"):
        return AutoencoderKL.from_single_file(name, config=str(CONFIGS_DIR), subfolder="vae", **kwargs)
    if (Path(name) / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(name, subfolder="vae", **kwargs)
    return AutoencoderKL.from_pretrained(name, **kwargs)


def _load_single_file(path: str, *, unet: bool, text: bool, vae: bool, dtype: torch.dtype | None) -> SDXLParts:
    """A single-file SDXL checkpoint (A1111/ComfyUI style), loaded piece by piece with the bundled configs."""
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}", hint="check model.base; give the path to a .safetensors file")
    kwargs: dict[str, Any] = {"config": str(CONFIGS_DIR), "low_cpu_mem_usage": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    parts = SDXLParts()
    if unet:
        parts.unet = _guarded(path, lambda: UNet2DConditionModel.from_single_file(path, subfolder="unet", **kwargs))
    if vae:
        parts.vae = _guarded(path, lambda: AutoencoderKL.from_single_file(path, subfolder="vae", **kwargs))
    if text:
        parts = _single_file_text(path, parts, dtype)
    return parts


def _single_file_text(path: str, parts: SDXLParts, dtype: torch.dtype | None) -> SDXLParts:
    """Text encoders of a single file need diffusers' pipeline loader (transformers has no from_single_file)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    pipe = _guarded(
        path,
        lambda: StableDiffusionXLPipeline.from_single_file(
            path, unet=parts.unet, vae=parts.vae, torch_dtype=dtype or torch.float32
        ),
    )
    parts.text_encoder, parts.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
    parts.tokenizer = pipe.tokenizer or tokenizer
    parts.tokenizer_2 = pipe.tokenizer_2 or tokenizer_2
    return parts
