"""SDXL model parts and LoRA.

Owns: loading the SDXL components (UNet, VAE, both CLIP text encoders, both
tokenizers, the training noise scheduler) from a hub id, a local diffusers
folder or a single-file checkpoint; the two builders that need no download
("tiny": a small SDXL-architecture model for CPU tests; "sdxl-random": the full
architecture from the bundled configs with random weights, for GPU benchmarks);
attaching LoRA through peft and moving LoRA weights in and out.

Must not: read or write storage, train, or touch the data. Loading never holds
two copies of the UNet in memory: weights go straight to the target device in
the target dtype (low_cpu_mem_usage).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from runner.errors import ModelError, ProfileError
from runner.profile import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
TINY = "tiny"
SDXL_RANDOM = "sdxl-random"
MAX_TOKENS = 77  # CLIP context length, prompt embeddings are [77, 2048] for SDXL
TINY_TEXT_DIM = 32  # hidden size of each tiny text encoder; the UNet sees 2 × 32
TINY_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the tiny UNet
LORA_MARK = "lora_"  # peft names every LoRA parameter lora_A / lora_B / lora_magnitude_vector


@dataclass
class SDXLParts:
    """The pieces of an SDXL model; a piece not loaded is None."""

    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    text_encoder_2: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    noise_scheduler: Any = None


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The DDPM scheduler SDXL was trained with (scaled_linear 0.00085..0.012, 1000 steps)."""
    config = json.loads((CONFIGS_DIR / "scheduler" / "scheduler_config.json").read_text())
    config.pop("_class_name", None)
    config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


# --- tokenizers built by code -------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """One printable symbol per byte value, as CLIP's byte-level BPE expects."""
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for value in range(256):
        if value in visible:
            symbols.append(chr(value))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _write_tiny_vocab(folder: Path) -> None:
    """A small CLIP vocabulary: every byte symbol, alone and word-final, plus a few merges."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    merges = ["r e", "re d</w>", "i n", "l e</w>", "s t", "a r", "c i", "q u"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer from the generated vocabulary (no download)."""
    with tempfile.TemporaryDirectory(prefix="relay-tok-") as tmp:
        _write_tiny_vocab(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)


# --- builders ------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for weight init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,  # SDXL uses the penultimate hidden state: at least 2 layers
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,  # 64 px / 8
        in_channels=4,
        out_channels=4,
        # attention at both levels (SDXL's first level has none): LoRA on attention must be able to move the
        # loss of a tiny random UNet within a few dozen steps
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=2 * TINY_TEXT_DIM,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TIME_EMBED_DIM * 6 + TINY_TEXT_DIM,  # 6 size ids + pooled
        norm_num_groups=32,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8× down-sampling like SDXL
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )


def build_tiny(seed: int = 0) -> SDXLParts:
    """A small SDXL-architecture model with random weights, deterministic from `seed`; works in
    diffusers' StableDiffusionXLPipeline."""
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    with _seeded(seed):
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, "gelu"))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, training_scheduler())


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _bundled(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS_DIR / name / "config.json").read_text())


def build_random_sdxl(
    *,
    unet: bool = True,
    text: bool = True,
    vae: bool = True,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> SDXLParts:
    """The full SDXL base 1.0 architecture with random weights, created directly on `device` in `dtype`
    (for GPU benchmarks; no download). Tokenizers are the generated ones."""
    dtype = dtype or torch.float32
    parts = SDXLParts(noise_scheduler=training_scheduler())
    with _seeded(seed), torch.device(device), _default_dtype(dtype):
        if unet:
            parts.unet = UNet2DConditionModel.from_config(_bundled("unet")).eval()
        if vae:
            parts.vae = AutoencoderKL.from_config(_bundled("vae")).eval()
        if text:
            parts.text_encoder = CLIPTextModel(CLIPTextConfig(**_bundled("text_encoder"))).eval()
            parts.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_bundled("text_encoder_2"))).eval()
    if text:
        parts.tokenizer, parts.tokenizer_2 = build_tokenizer(), build_tokenizer()
    return parts


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


COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
RECOMPILE_LIMIT = 64  # block variants (channel counts, shortcut or not) × aspect buckets


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
        unet = UNet2DConditionModel.from_config(_bundled("unet"))
        return attach_lora(unet, lora_cfg)
