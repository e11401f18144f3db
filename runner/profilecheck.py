"""Checking a profile's keys and values: raw TOML data in, a valid `Profile` out, or an error that says what to fix.

Owns: `build_profile` (unknown keys and sections, wrong types, values out of range, impossible
combinations such as random crop with cached latents or a warm-up longer than the run), the allowed
values of each key (`CHOICES`, `RANGES`, the module names LoRA may target), the text encoders'
defaults filled in from the UNet's, and `apply_override`: one `--set section.key=value` (the value
parsed as TOML, else taken as text) applied to the raw data. Every error is a ProfileError naming
the file, the key and what is allowed.

Must not: read files or know where a profile came from beyond the name it is given (runner.profile
loads, and blames a value given on the command line on its flag); import anything above errors.py.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import fields
from typing import Any, get_type_hints

from runner.errors import ProfileError
from runner.profileschema import SECTIONS, TOP_KEYS, LoraConfig, Profile, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older notebook images)
    import tomli as tomllib

CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("auto", "fp16", "bf16", "fp32"),
    "train.optimizer": ("adamw", "adamw8bit", "prodigy"),
    "train.gradient_checkpointing": ("auto", "on", "off"),
    "train.compile": ("auto", "off", "blocks", "graphs"),
    "train.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "train.prediction_type": ("epsilon", "v_prediction"),
    "lora.init": ("default", "gaussian"),
}

# Module names (suffixes) LoRA may target. UNet: attention projections, the transformer's proj_in/out and
# feed-forward, the ResNet convolutions and time projection, down/up-sampler convs, the UNet's own in/out
# convs and embeddings. Text encoders (CLIP): attention projections and the MLP.
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out",
    "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2",
)  # fmt: skip
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


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
