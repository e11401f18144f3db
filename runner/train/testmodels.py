"""Models that need no download: "tiny", a small SDXL-architecture model for CPU tests, and "sdxl-random",
the full architecture from the bundled configs with random weights, for GPU benchmarks; and the CLIP
tokenizer built by code that both use.

Must not: read or write storage, or download anything.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from runner.train.model import (
    MAX_TOKENS,
    TINY_TEXT_DIM,
    TINY_TIME_EMBED_DIM,
    SDXLParts,
    bundled_config,
    training_scheduler,
)

log = logging.getLogger(__name__)


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
            parts.unet = UNet2DConditionModel.from_config(bundled_config("unet")).eval()
        if vae:
            parts.vae = AutoencoderKL.from_config(bundled_config("vae")).eval()
        if text:
            parts.text_encoder = CLIPTextModel(CLIPTextConfig(**bundled_config("text_encoder"))).eval()
            parts.text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**bundled_config("text_encoder_2"))
            ).eval()
    if text:
        parts.tokenizer, parts.tokenizer_2 = build_tokenizer(), build_tokenizer()
    return parts
