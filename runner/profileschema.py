"""The profile's schema: typed, frozen run settings, and which of them change the trained weights.

Owns: one frozen dataclass per TOML section (each field documented where it is declared, with its
default), `Profile` that holds them, the names of the sections and top-level keys, and the
fingerprint: `fingerprint_fields` lists exactly the settings that change the trained weights and
`fingerprint` hashes them, so a run resumed with other weights-changing settings is refused.

Must not: read files or check values (runner.profilecheck validates, runner.profile loads);
import anything above errors.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """Hub id, local diffusers folder, single-file .safetensors, or a builder: "tiny", "sdxl-random"."""
    vae: str = ""
    """Optional separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix; empty: the base's VAE."""
    revision: str = ""
    """Hub revision (branch, tag or commit); empty: the default branch."""
    variant: str = ""
    """Hub weight variant, e.g. "fp16"; empty: the default weights."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "lambdalabs/naruto-blip-captions"
    """HF dataset name, local folder of images (+ .txt or metadata.jsonl), or "generated"."""
    image_column: str = "image"
    """Column holding the image (HF datasets and metadata.jsonl)."""
    caption_column: str = "text"
    """Column holding the caption."""
    split: str = "train"
    """HF dataset split."""
    limit: int = 0
    """Use at most this many examples; 0: all."""
    generated_count: int = 16
    """Number of images in the "generated" source."""
    buckets: bool = True
    """Aspect-ratio buckets around the target area; false: square resize + center crop."""
    flip: bool = False
    """Random horizontal flip (both flips are cached)."""
    random_crop: bool = False
    """Random crop; incompatible with cached latents, so it is refused."""
    caption_dropout: float = 0.0
    """Probability of training a step's example with the empty caption."""
    validation_count: int = 4
    """Examples held out for validation loss; 0: no validation."""
    max_bad_fraction: float = 0.1
    """Stop when more than this fraction of images is unreadable (one bad image is always tolerated)."""
    min_images: int = 3
    """Stop before the model loads when fewer readable images than this remain."""
    instance_prompt: str = ""
    """One caption for every image, replacing the dataset's (DreamBooth-style sets); "": the dataset's captions."""
    trigger_word: str = ""
    """Prepended to every caption as "TRIGGER, caption" (to the instance prompt too); "": none."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet module names (suffixes) that get LoRA."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    init: str = "default"
    """peft initialisation of the A matrix: "default" (Kaiming) or "gaussian"."""
    text_encoder: bool = False
    """Also train LoRA on both CLIP text encoders (the caption tokens are cached instead of their embeddings)."""
    text_encoder_lr: float = 0.0
    """Peak learning rate of the text encoders' LoRA (kohya's text_encoder_lr); 0: train.lr."""
    text_encoder_rank: int = 0
    """LoRA rank on the text encoders; 0: lora.rank."""
    text_encoder_alpha: float = 0.0
    """LoRA alpha on the text encoders; 0: lora.alpha."""
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """Text-encoder module names (suffixes) that get LoRA: attention q/k/v/out_proj, and the MLP fc1, fc2."""
    text_encoder_8bit: bool = False
    """Keep the frozen text-encoder weights in 8-bit (bitsandbytes; CUDA only)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    """Target optimizer steps for the whole run, across sessions."""
    resolution: int = 1024
    """Training resolution in pixels (the bucket area is resolution²)."""
    batch_size: int = 1
    """Micro-batch: examples per forward/backward pass on one GPU; the fit may lower it (more accumulation)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step on one process. batch_size × grad_accum is the run's effective batch:
    examples per optimizer step across ALL processes. Each session splits it into processes × micro-batch
    × per-process accumulation (effective / (processes × micro-batch)), so the same run trains on one GPU
    or two; the effective batch must divide by the session's process count."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear or cosine."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    seed: int = 42
    """Seed of every random draw: data order, noise, timesteps, dropout."""
    precision: str = "fp16"
    """auto, fp16 (GradScaler), bf16 or fp32. CPUs always train in fp32."""
    optimizer: str = "adamw"
    """adamw (torch, fused on CUDA), adamw8bit (bitsandbytes, CUDA only) or prodigy (the prodigyopt package:
    it estimates the step size itself, so train.lr is a multiplier, 1.0 as usual)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0: off."""
    gradient_checkpointing: str = "auto"
    """auto (only when the step does not fit without it), on, off."""
    compile: str = "auto"
    """CUDA GPUs only (CPUs stay eager): off; blocks (torch.compile of the UNet's blocks); graphs (blocks, and
    each micro-batch replayed as a CUDA graph; needs lora.dropout = 0); auto (see bench/RESULTS.md)."""
    prediction_type: str = "epsilon"
    """epsilon or v_prediction."""
    snr_gamma: float = 0.0
    """Min-SNR weighting gamma; 0: off (5.0 is the usual value)."""
    noise_offset: float = 0.0
    """Noise offset; 0: off."""
    max_nan_steps: int = 10
    """Stop after this many non-finite losses in a row."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_min: float = 10.0
    """Bound on work at risk: checkpoint at least this often, in minutes of training."""
    keep: int = 3
    """Committed checkpoints to keep."""
    max_overhead_pct: float = 2.0
    """Checkpointing may take at most this share of training time."""


@dataclass(frozen=True)
class SessionConfig:
    hours: float = 0.0
    """Session length in hours; 0: the platform's default limit (--hours overrides)."""
    margin_min: float = 3.0
    """Safety margin before the deadline, in minutes, on top of the measured checkpoint cost."""
    release_gpu: bool = False
    """On Colab, end the runtime after the final commit so no GPU quota idles."""
    chain: str = ""
    """"kaggle": a session ending with "run me again" pushes the next one on Kaggle (docs/chain.md); "": off."""
    chain_notebook: str = ""
    """The Kaggle notebook the chain pushes, "USER/SLUG" (a running notebook cannot name itself)."""


@dataclass(frozen=True)
class SampleConfig:
    every_steps: int = 0
    """Sample every N steps during training; 0: only at the end."""
    prompts: tuple[str, ...] = ("Bill Gates in Naruto style", "a cat ninja, Naruto style")
    """Prompts of the base-vs-LoRA grid."""
    seed: int = 0
    """Seed of the sample noise (same for base and LoRA)."""
    inference_steps: int = 30
    """Denoising steps per image."""
    guidance: float = 7.0
    """Classifier-free guidance scale."""


@dataclass(frozen=True)
class PublishConfig:
    enabled: bool = False
    """At completion, push final/ (both LoRA files, model card, sample grid) to a Hugging Face model repo."""
    repo: str = ""
    """USER/NAME of that repo; empty: YOUR_NAME/RUN (token from HF_TOKEN)."""
    public: bool = False
    """Make a newly created repo public (an existing repo keeps its visibility)."""


@dataclass(frozen=True)
class DashboardConfig:
    plain_every_s: float = 30.0
    """Without a terminal, print one plain progress line this often."""
    refresh_per_s: float = 2.0
    """Live view redraws per second at most."""


@dataclass(frozen=True)
class Profile:
    name: str = "unnamed"
    """Profile name."""
    run: str = ""
    """The default run name (--run overrides); empty: the profile's name. Profiles of one job on different
    platforms or GPU counts share it, so each of them continues the same run."""
    description: str = ""
    """One line for `relay profiles`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    variant: str = ""
    """The variant of an experiment this profile is ("" for a plain profile or an experiment's base)."""
    variants: tuple[Profile, ...] = ()
    """An experiment's variants, in declared order, each a whole profile (the base with its overrides)."""
    source_path: str = ""
    """Where it was loaded from (not a setting)."""

    @property
    def run_name(self) -> str:
        """The run a session of this profile continues unless --run names another."""
        return self.run or self.name

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain TOML-able data (for run.json and the model card)."""
        data = dataclasses.asdict(dataclasses.replace(self, variants=()))
        for key in ("source_path", "variants"):
            data.pop(key)
        return json.loads(json.dumps(data))  # tuples → lists


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "session": SessionConfig,
    "sample": SampleConfig,
    "dashboard": DashboardConfig,
    "publish": PublishConfig,
}
TOP_KEYS = ("name", "run", "description")

# Sections and keys that change the trained weights. batch_size × grad_accum enter as the
# effective batch (the fit may split it differently on another GPU without changing the run).
FINGERPRINT_SECTIONS = ("model", "data", "lora", "train")
# Text-encoder LoRA settings change nothing while lora.text_encoder is off: left out then, so runs started
# before these keys existed keep their fingerprint.
TEXT_ENCODER_KEYS = (
    "lora.text_encoder_lr",
    "lora.text_encoder_rank",
    "lora.text_encoder_alpha",
    "lora.text_encoder_targets",
    "lora.text_encoder_8bit",
)
FINGERPRINT_EXCLUDED = {
    "train.batch_size",
    "train.grad_accum",
    "train.gradient_checkpointing",
    "train.compile",
    "data.max_bad_fraction",
    "data.min_images",
}


def fingerprint_fields(p: Profile) -> dict[str, Any]:
    """The flat `section.key → value` map of every setting that changes the trained weights."""
    data = p.to_dict()
    out: dict[str, Any] = {}
    for section in FINGERPRINT_SECTIONS:
        for key, value in data[section].items():
            dotted = f"{section}.{key}"
            if dotted in FINGERPRINT_EXCLUDED or (dotted in TEXT_ENCODER_KEYS and not p.lora.text_encoder):
                continue
            out[dotted] = value
    out["train.effective_batch"] = p.train.batch_size * p.train.grad_accum
    return out


def fingerprint(p: Profile) -> str:
    """A short stable hash of `fingerprint_fields`."""
    blob = json.dumps(fingerprint_fields(p), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two `fingerprint_fields` maps. A key one map lacks (a setting
    added in a later Relay, absent from an older run.json) counts as its default value."""
    defaults = fingerprint_fields(Profile())
    keys = set(old) | set(new)
    pairs = {k: (old.get(k, defaults.get(k)), new.get(k, defaults.get(k))) for k in keys}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}
