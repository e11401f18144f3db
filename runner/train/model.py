"""SDXL's parts: what a loaded model is made of, and the noise scheduler it was trained with.

Owns: `SDXLParts` and `training_scheduler`, and the constants the model modules share. The other model
modules build on it: `testmodels` (the tiny and the random full-size builders), `loading` (hub id, local
folder or single file), `lora` (LoRA on the UNet and the text encoders, its weights in and out), `eightbit`
(8-bit frozen text encoders) and `compiling` (compiled blocks and their cache).

Must not: read or write storage, train, or touch the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler

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


def bundled_config(name: str) -> dict[str, Any]:
    """The bundled SDXL config of one part (runner/configs/NAME/config.json), read with no download."""
    return json.loads((CONFIGS_DIR / name / "config.json").read_text())
