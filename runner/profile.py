"""Profiles: typed, frozen run settings loaded from TOML.

Owns: the schema (one frozen dataclass per section, each field documented where
it is declared), loading a profile by name or path, `--set section.key=value`
overrides, validation (once, at load, naming the file, the key and the fix),
the variants of an experiment (`[[variants]]` tables: a name plus overrides of the
base profile's keys, each validated as a profile of its own) and the fingerprint
of the fields that change the trained weights. Nothing deeper re-checks
configuration. Imports nothing above errors.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from runner.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older notebook images)
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("auto", "fp16", "bf16", "fp32"),
    "train.optimizer": ("adamw", "adamw8bit", "prodigy"),
    "train.gradient_checkpointing": ("auto", "on", "off"),
    "train.compile": ("auto", "off", "blocks", "graphs"),
    "train.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "train.prediction_type": ("epsilon", "v_prediction"),
    "lora.init": ("default", "gaussian"),
}


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
VARIANTS_KEY = "variants"
VARIANT_SEPARATOR = "--"  # a variant's run is EXPERIMENT--VARIANT
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

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
# Module names (suffixes) LoRA may target. UNet: attention projections, the transformer's proj_in/out and
# feed-forward, the ResNet convolutions and time projection, down/up-sampler convs, the UNet's own in/out
# convs and embeddings. Text encoders (CLIP): attention projections and the MLP.
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out",
    "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2",
)  # fmt: skip
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
FINGERPRINT_EXCLUDED = {
    "train.batch_size",
    "train.grad_accum",
    "train.gradient_checkpointing",
    "train.compile",
    "data.max_bad_fraction",
    "data.min_images",
}


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _fraction(v: float) -> bool:
    return 0 <= v < 1


def _is_target(name: str, known: tuple[str, ...]) -> bool:
    """A known module name, or a path ending in one (peft matches target names as suffixes)."""
    return any(name == k or name.endswith("." + k) for k in known)


# key → (predicate, what is allowed)
RANGES: dict[str, tuple[Any, str]] = {
    "data.limit": (_non_negative, "0 (all) or a positive count"),
    "data.generated_count": (_positive, "a positive count"),
    "data.caption_dropout": (_fraction, "a probability in [0, 1)"),
    "data.validation_count": (_non_negative, "0 or more"),
    "data.max_bad_fraction": (_fraction, "a fraction in [0, 1)"),
    "data.min_images": (_positive, "a positive count of readable images"),
    "lora.rank": (_positive, "a positive integer (16 is usual)"),
    "lora.alpha": (_positive, "a positive number (often 2 × rank)"),
    "lora.dropout": (_fraction, "a probability in [0, 1)"),
    "lora.targets": (
        lambda v: len(v) > 0 and all(_is_target(t, UNET_TARGETS) for t in v),
        f"a non-empty list of UNet module names (or paths ending in one, e.g. attn2.to_k) from: "
        f"{', '.join(UNET_TARGETS)}",
    ),
    "lora.text_encoder_lr": (lambda v: 0 <= v < 1, "0 (train.lr) or a learning rate in (0, 1), e.g. 5e-5"),
    "lora.text_encoder_rank": (_non_negative, "0 (lora.rank) or a positive integer"),
    "lora.text_encoder_alpha": (_non_negative, "0 (lora.alpha) or a positive number"),
    "lora.text_encoder_targets": (
        lambda v: len(v) > 0 and all(_is_target(t, TEXT_ENCODER_TARGETS) for t in v),
        f"a non-empty list of CLIP module names (or paths ending in one) from: {', '.join(TEXT_ENCODER_TARGETS)}",
    ),
    "train.steps": (_positive, "a positive number of optimizer steps"),
    "train.resolution": (lambda v: v >= 32 and v % 8 == 0, "a multiple of 8, at least 32 (1024 or 512 for SDXL)"),
    "train.batch_size": (_positive, "a positive integer"),
    "train.grad_accum": (_positive, "a positive integer"),
    "train.lr": (lambda v: 0 < v <= 10, "a learning rate in (0, 1), e.g. 1e-4 (with prodigy: a multiplier, 1.0)"),
    "train.warmup_steps": (_non_negative, "0 or more steps"),
    "train.seed": (_non_negative, "a non-negative integer"),
    "train.weight_decay": (_non_negative, "0 or more"),
    "train.max_grad_norm": (_non_negative, "0 (off) or a positive norm"),
    "train.snr_gamma": (_non_negative, "0 (off) or a positive gamma, e.g. 5.0"),
    "train.noise_offset": (lambda v: 0 <= v < 1, "0 (off) or a small value such as 0.05"),
    "train.max_nan_steps": (_positive, "a positive count"),
    "checkpoint.every_min": (_positive, "a positive number of minutes"),
    "checkpoint.keep": (_positive, "1 or more"),
    "checkpoint.max_overhead_pct": (lambda v: 0 < v <= 50, "a percentage in (0, 50]"),
    "session.hours": (lambda v: 0 <= v <= 48, "0 (platform default) or hours up to 48"),
    "session.margin_min": (_non_negative, "0 or more minutes"),
    "session.chain": (lambda v: v in ("", "kaggle"), '"" (off) or "kaggle"'),
    "session.chain_notebook": (lambda v: v == "" or (v.count("/") == 1 and all(v.split("/"))), '"" or "USER/SLUG"'),
    "sample.every_steps": (_non_negative, "0 (only at the end) or a positive step count"),
    "sample.inference_steps": (_positive, "a positive count"),
    "sample.guidance": (_non_negative, "0 or more"),
    "dashboard.plain_every_s": (_positive, "a positive number of seconds"),
    "dashboard.refresh_per_s": (_positive, "a positive rate"),
    "publish.repo": (lambda v: v == "" or v.count("/") == 1 and all(v.split("/")), "empty or USER/NAME"),
}


def list_profiles(directory: Path = PROFILES_DIR) -> list[tuple[str, str]]:
    """(name, description) of every profile shipped in `directory`."""
    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            desc = str(tomllib.loads(path.read_text()).get("description", ""))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            desc = f"(unreadable: {exc})"
        out.append((path.stem, desc))
    return out


def resolve_profile_path(name_or_path: str, directory: Path = PROFILES_DIR) -> Path:
    """A profile given by name (shipped in profiles/) or by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or "/" in name_or_path:
        if not path.is_file():
            raise ProfileError(
                f"profile file not found: {path}", hint="give a path to a .toml file or a name from `relay profiles`"
            )
        return path
    shipped = directory / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(n for n, _ in list_profiles(directory)) or "none"
    raise ProfileError(
        f"no profile named {name_or_path!r}", hint=f"shipped profiles: {names}; or give a path to a .toml file"
    )


TEST_TINY_ENV = "RELAY_TEST_TINY_MODEL"
"""Tests only: a target step count N. Every profile then trains the tiny model on a few generated images at 32 px
for N steps; its name, run key and effective batch stay as shipped (docs/platforms.md, "Testing what ships")."""


def test_tiny_overrides(value: str) -> list[str]:
    """The --set items RELAY_TEST_TINY_MODEL=N stands for (none when it is unset or empty)."""
    if not value.strip():
        return []
    if not value.strip().isdigit() or int(value) < 1:
        raise ProfileError(f"must be a positive step count, not {value!r}", path=f"${TEST_TINY_ENV}")
    return ["model.base=tiny", "model.vae=", "model.variant=", "model.revision=", "data.source=generated",
            "data.generated_count=4", "data.validation_count=0", "data.limit=0", "train.resolution=32",
            f"train.steps={int(value)}", "train.warmup_steps=0", "sample.inference_steps=1"]  # fmt: skip


def load_profile(
    name_or_path: str, overrides: list[str] = (), directory: Path = PROFILES_DIR, *, flags: dict[str, str] | None = None
) -> Profile:
    """Load, override and validate a profile. Raises ProfileError naming the file and key, or for a value
    that came from the command line, the flag: `--set KEY=VALUE`, or `flags[KEY]` (e.g. "--hours 0.5")."""
    path = resolve_profile_path(name_or_path, directory)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"not valid TOML: {exc}", path=str(path)) from None
    except OSError as exc:
        raise ProfileError(f"cannot read: {exc.strerror}", path=str(path)) from None
    raw.setdefault("name", path.stem)
    variant_tables = raw.pop(VARIANTS_KEY, None)
    file_raw = copy.deepcopy(raw)  # the file's own settings: each variant overrides these, then --set applies
    origins = {}
    overrides = [*test_tiny_overrides(os.environ.get(TEST_TINY_ENV, "")), *overrides]
    for item in overrides:
        apply_override(raw, item)
        key = item.partition("=")[0].strip()
        origins[key] = (flags or {}).get(key, f"--set {item.strip()}")
    base = _build_blamed(raw, str(path), origins)
    if variant_tables is None:
        return base
    variants = []
    for name, table in _variant_tables(variant_tables, str(path)):
        vraw = _merged(copy.deepcopy(file_raw), table)
        vraw["run"] = f"{base.run_name}{VARIANT_SEPARATOR}{name}"
        for item in overrides:
            apply_override(vraw, item)
        try:
            variant = _build_blamed(vraw, str(path), origins)
        except ProfileError as exc:
            where = exc.path if exc.path != str(path) else f"{path}: variant {name!r}"
            raise ProfileError(exc.detail, path=where, key=exc.key, hint=exc.hint) from None
        variants.append(dataclasses.replace(variant, variant=name))
    return dataclasses.replace(base, variants=tuple(variants))


def _build_blamed(raw: dict[str, Any], source: str, origins: dict[str, str]) -> Profile:
    """build_profile; an error about a value given on the command line names that flag, not the file."""
    try:
        return build_profile(raw, source=source)
    except ProfileError as exc:
        flag = next((f for k, f in origins.items() if exc.key and (k == exc.key or k.startswith(exc.key + "."))), None)
        if flag is None:
            raise
        raise exc.blamed_on(flag) from None


def _variant_tables(tables: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of each `[[variants]]` table, checked for shape; the values are checked when each
    variant is built as a profile of its own."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ProfileError("must be one or more [[variants]] tables", path=source, key=VARIANTS_KEY,
                           hint='e.g. [[variants]] name = "dropout" lora.dropout = 0.5')  # fmt: skip
    out: list[tuple[str, dict[str, Any]]] = []
    for n, table in enumerate(tables, start=1):
        name = table.get("name")
        where = f"{source}: variant {name!r}" if isinstance(name, str) else f"{source}: variant #{n}"
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or VARIANT_SEPARATOR in name:
            raise ProfileError(f"needs a name of letters, digits, '_', '.' or '-', got {name!r}", path=where,
                               key="name", hint='e.g. name = "dropout-0.5" (it names the run: EXPERIMENT--NAME)')  # fmt: skip
        if name in (seen for seen, _ in out):
            raise ProfileError("two variants have this name", path=where, key="name", hint="give each its own name")
        overrides = {k: v for k, v in table.items() if k != "name"}
        for key, value in overrides.items():
            if key in ("run", "name"):
                raise ProfileError("a variant cannot set this", path=where, key=key,
                                   hint="its run is named after the experiment and the variant")  # fmt: skip
            if key in SECTIONS and not isinstance(value, dict):
                raise ProfileError(f"must be a table of {key}.* keys", path=where, key=key)
        out.append((name, overrides))
    return out


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with each section's keys replaced by the variant's (the other keys of the section kept)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` to the raw TOML data; the value is parsed as TOML, else taken as text."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ProfileError(f"--set {item!r}: expected section.key=value", hint="e.g. --set train.lr=2e-4")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    if len(parts) == 1:
        raw[key] = value
    elif len(parts) == 2:
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ProfileError(f"--set {item!r}: {parts[0]} is not a section")
        section[parts[1]] = value
    else:
        raise ProfileError(f"--set {item!r}: keys have the form section.key", hint="e.g. --set lora.rank=32")


def build_profile(raw: dict[str, Any], source: str = "<profile>") -> Profile:
    """Validate raw TOML data into a Profile."""
    unknown = set(raw) - set(SECTIONS) - set(TOP_KEYS)
    if unknown:
        key = sorted(unknown)[0]
        raise ProfileError(
            "unknown key or section", path=source, key=key, hint=f"allowed: {', '.join([*TOP_KEYS, *SECTIONS])}"
        )
    top = {k: _coerce(source, k, raw[k], str) for k in TOP_KEYS if k in raw}
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ProfileError(f"must be a table [{name}]", path=source, key=name)
        sections[name] = _build_section(source, name, cls, value)
    sections["lora"] = _resolve_text_encoder_defaults(sections["lora"], sections["train"])
    profile = Profile(**top, **sections, source_path=source)
    _check_combinations(profile, source)
    return profile


def _resolve_text_encoder_defaults(lora: LoraConfig, train: TrainConfig) -> LoraConfig:
    """The text encoders' lr, rank and alpha default (0) to the UNet's: fill them in once, here."""
    return dataclasses.replace(
        lora,
        text_encoder_lr=lora.text_encoder_lr or train.lr,
        text_encoder_rank=lora.text_encoder_rank or lora.rank,
        text_encoder_alpha=lora.text_encoder_alpha or lora.alpha,
    )


def _build_section(source: str, section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in hints:
            raise ProfileError("unknown key", path=source, key=dotted, hint=f"[{section}] allows: {', '.join(names)}")
        kwargs[key] = _coerce(source, dotted, value, hints[key])
        _check_value(source, dotted, kwargs[key])
    return cls(**kwargs)


def _coerce(source: str, key: str, value: Any, typ: Any) -> Any:
    """Check a TOML value against a field type; ints are accepted where floats are."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ProfileError(f"expected true or false, got {value!r}", path=source, key=key)
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProfileError(f"expected an integer, got {value!r}", path=source, key=key)
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ProfileError(f"expected a number, got {value!r}", path=source, key=key)
    if typ is str:
        if key == "train.gradient_checkpointing" and isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            allowed = CHOICES.get(key)
            if allowed and value not in allowed:
                raise ProfileError(
                    f"{value!r} is not allowed", path=source, key=key, hint=f"choose one of: {', '.join(allowed)}"
                )
            return value
        raise ProfileError(f"expected a string, got {value!r}", path=source, key=key)
    if typ == tuple[str, ...]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ProfileError(f"expected a list of strings, got {value!r}", path=source, key=key)
    raise AssertionError(f"unhandled type {typ} for {key}")


def _check_value(source: str, key: str, value: Any) -> None:
    rule = RANGES.get(key)
    if rule and not rule[0](value):
        raise ProfileError(f"{value!r} is out of range", path=source, key=key, hint=f"allowed: {rule[1]}")


def _check_combinations(p: Profile, source: str) -> None:
    if p.lora.text_encoder_8bit and not p.lora.text_encoder:
        raise ProfileError(
            "8-bit text encoders only apply when the text encoders are trained",
            path=source,
            key="lora.text_encoder_8bit",
            hint="set lora.text_encoder = true, or drop lora.text_encoder_8bit",
        )
    if p.data.random_crop:
        raise ProfileError(
            "random crop cannot be used with cached latents (each crop would need a fresh VAE encode)",
            path=source,
            key="data.random_crop",
            hint="set data.random_crop = false; aspect-ratio buckets (data.buckets) keep the whole image instead",
        )
    if p.train.lr >= 1 and p.train.optimizer != "prodigy":
        raise ProfileError(
            f"{p.train.lr!r} is out of range",
            path=source,
            key="train.lr",
            hint="allowed: a learning rate in (0, 1), e.g. 1e-4 (only prodigy takes a multiplier such as 1.0)",
        )
    if p.train.warmup_steps >= p.train.steps:
        raise ProfileError(
            f"warm-up ({p.train.warmup_steps}) must be shorter than the run ({p.train.steps} steps)",
            path=source,
            key="train.warmup_steps",
        )


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
