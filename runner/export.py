"""The final LoRA: files other tools load, and a model card.

Owns: turning the trainer's peft-format LoRA state dict (the UNet's keys as
peft names them, the text encoders' under "text_encoder." / "text_encoder_2.")
into
  - pytorch_lora_weights.safetensors: diffusers' format ("unet." + peft keys,
    "text_encoder." / "text_encoder_2." + the encoder's module path),
    read by `StableDiffusionXLPipeline.load_lora_weights(folder)`;
  - NAME.kohya.safetensors: kohya keys (lora_unet_*, lora_te1_*, lora_te2_*
    with .lora_down/.lora_up/.alpha), read by ComfyUI, AUTOMATIC1111 and diffusers;
  - README.md: a model card (base model, data, settings, steps, sessions, which
    file for which tool, how to load it, the sample grid and loss curve when
    there are).

The scale alpha / rank must survive: a diffusers file without adapter metadata
is loaded with alpha = rank (scale 1), so the scale is folded into lora_B
(exact for LoRA and DoRA); the text encoders use their own rank and alpha. The
kohya file keeps the raw weights and the real alpha, which kohya-format
loaders apply.

Text-encoder module paths are written as every loader expects them,
"text_model.encoder.layers.N…" for both encoders: transformers 5 dropped the
text_model level from CLIPTextModel (CLIP-L) but kept it in
CLIPTextModelWithProjection, and kohya files, A1111 and diffusers use it.

Must not: train, read storage or upload (the session uploads out_dir).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from runner.errors import ModelError
from runner.profile import LoraConfig

log = logging.getLogger(__name__)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = ".kohya.safetensors"
CARD_FILE = "README.md"
GRID_FILE = "samples.png"
LOSS_FILE = "loss.png"
UNET_PREFIX = "unet."
KOHYA_UNET_PREFIX = "lora_unet_"
PEFT_A, PEFT_B, PEFT_MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
TEXT_MODEL = "text_model."
# state-dict prefix of each text encoder's LoRA → (diffusers prefix, kohya prefix); the longer prefix first
TEXT_ENCODER_PREFIXES = {
    "text_encoder_2.": ("text_encoder_2.", "lora_te2_"),
    "text_encoder.": ("text_encoder.", "lora_te1_"),
}


@dataclass(frozen=True)
class CardInfo:
    """What the model card says beyond the profile."""

    name: str
    """Run name; also the kohya file's name."""
    steps: int
    """Optimizer steps trained."""
    sessions: tuple[dict, ...] = ()
    """sessions.jsonl entries (platform, gpu, step_from, step_to, reason)."""
    sample_grid: str = ""
    """Path of a base-vs-LoRA grid PNG to include; empty: none."""
    loss_curve: str = ""
    """Path of the run's loss-curve PNG (runner.losscurve) to include; empty: none."""
    final_loss: float | None = None
    """Smoothed training loss at the end, if known."""
    extra: dict = field(default_factory=dict)
    """More `key: value` lines for the card."""


def export_lora(
    lora_sd: dict[str, torch.Tensor], lora_cfg: LoraConfig, out_dir: Path, *, profile_dict: dict, card: CardInfo,
    save_dtype: torch.dtype = torch.float32,
) -> list[Path]:  # fmt: skip
    """Write the diffusers file, the kohya file and README.md into out_dir; return the paths written."""
    _check_keys(lora_sd)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "relay.rank": str(lora_cfg.rank), "relay.alpha": str(lora_cfg.alpha)}
    written = [out_dir / DIFFUSERS_FILE]
    save_stable(_to_diffusers(lora_sd, lora_cfg, save_dtype), written[0], metadata=meta)
    kohya_name = safe_name(card.name) + KOHYA_SUFFIX
    if lora_cfg.dora:
        log.warning("DoRA LoRA: no kohya file written (kohya's DoRA layout differs); use %s", DIFFUSERS_FILE)
    else:
        written.append(out_dir / kohya_name)
        save_stable(_to_kohya(lora_sd, lora_cfg, save_dtype), written[-1], metadata=meta)
    grid = _copy_png(card.sample_grid, out_dir / GRID_FILE, "sample grid")
    curve = _copy_png(card.loss_curve, out_dir / LOSS_FILE, "loss curve")
    written += [p for p in (grid, curve) if p is not None]
    written.append(out_dir / CARD_FILE)
    kohya = None if lora_cfg.dora else kohya_name
    written[-1].write_text(model_card(profile_dict, card, kohya_file=kohya, has_grid=grid is not None,
                                      has_loss_curve=curve is not None))  # fmt: skip
    log.info("exported LoRA (%d tensors) to %s", len(lora_sd), out_dir)
    return written


def save_stable(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and the metadata.

    safetensors keeps the metadata in a hash map whose order changes from one save to the next, so two
    runs with identical tensors wrote files that differed in their header; users compare files by hash.
    The header is re-written with the metadata's keys sorted: same length, same tensors, same offsets.
    """
    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # cannot happen for a re-ordering; refuse rather than write a broken file
        raise ModelError(f"safetensors header grew while sorting its metadata ({len(text)} > {size} bytes)")
    Path(path).write_bytes(data[:8] + text.ljust(size, b" ") + data[8 + size :])


def safe_name(name: str) -> str:
    """A file-name-safe version of the run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lora"


def _check_keys(lora_sd: dict[str, torch.Tensor]) -> None:
    """The silent failure to prevent: a file whose keys match nothing loads as a no-op."""
    if not any(k.endswith(PEFT_A) for k in lora_sd) or not any(k.endswith(PEFT_B) for k in lora_sd):
        sample = sorted(lora_sd)[:3]
        raise ModelError(
            f"not a peft LoRA state dict of the UNet (no *.lora_A.weight / *.lora_B.weight keys; got {sample})",
            hint="pass lora_state_dict(unet) from runner.train.lora, or the run's checkpoint lora.safetensors",
        )


def _locate(key: str, cfg: LoraConfig) -> tuple[str, str, str, float, float]:
    """(diffusers prefix, kohya prefix, module key in the loaders' naming, rank, alpha) of a state-dict key."""
    for prefix, (diffusers_prefix, kohya_prefix) in TEXT_ENCODER_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            rest = rest if rest.startswith(TEXT_MODEL) else TEXT_MODEL + rest
            rank, alpha = cfg.text_encoder_rank or cfg.rank, cfg.text_encoder_alpha or cfg.alpha
            return diffusers_prefix, kohya_prefix, rest, rank, alpha
    return UNET_PREFIX, KOHYA_UNET_PREFIX, key, cfg.rank, cfg.alpha


def _to_diffusers(sd: dict[str, torch.Tensor], cfg: LoraConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """'unet.' + peft keys ('text_encoder.' / 'text_encoder_2.' + theirs), with each part's alpha / rank folded
    into lora_B so loaders can assume scale 1."""
    out = {}
    for key, value in sd.items():
        prefix, _, module_key, rank, alpha = _locate(key, cfg)
        value = value.detach().float()
        if key.endswith(PEFT_B):
            value = value * (alpha / rank)
        out[prefix + module_key] = value.to(dtype).contiguous()
    return out


def _to_kohya(sd: dict[str, torch.Tensor], cfg: LoraConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """lora_unet_ / lora_te1_ / lora_te2_ + <module with _>.lora_down.weight / .lora_up.weight / .alpha (raw
    weights, real alpha). A conv LoRA keeps its shapes: down [r, in, k, k], up [out, r, 1, 1], as kohya's."""
    out = {}
    for key, value in sd.items():
        _, kohya_prefix, module_key, _, alpha = _locate(key, cfg)
        if module_key.endswith(PEFT_A):
            module, part = module_key[: -len(PEFT_A)], "lora_down.weight"
        elif module_key.endswith(PEFT_B):
            module, part = module_key[: -len(PEFT_B)], "lora_up.weight"
        else:
            raise ModelError(f"LoRA key {key!r} has no kohya equivalent", hint="export without DoRA for kohya tools")
        name = kohya_prefix + module.replace(".", "_")
        out[f"{name}.{part}"] = value.detach().to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def _copy_png(path: str, target: Path, what: str) -> Path | None:
    if not path:
        return None
    source = Path(path)
    if not source.is_file():
        log.warning("%s %s not found; the model card will not show it", what, source)
        return None
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target


def model_card(
    profile_dict: dict, card: CardInfo, *, kohya_file: str | None, has_grid: bool, has_loss_curve: bool = False
) -> str:
    """README.md for the final/ folder (Hugging Face model card front matter + usage)."""
    model, data = profile_dict.get("model", {}), profile_dict.get("data", {})
    lora, train = profile_dict.get("lora", {}), profile_dict.get("train", {})
    base = model.get("base", "?")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [lora, stable-diffusion-xl, text-to-image, relay]",
        "---",
        "",
        f"# {card.name}",
        "",
        f"SDXL LoRA trained with Relay for {card.steps} steps over {len(card.sessions) or 1} session(s).",
        "",
        "## Training",
        "",
        f"- base model: `{base}`" + (f" (VAE `{model['vae']}`)" if model.get("vae") else ""),
        f"- data: `{data.get('source', '?')}` (captions from `{data.get('caption_column', '?')}`)",
        f"- LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"targets {', '.join(lora.get('targets', []))}" + (", DoRA" if lora.get("dora") else ""),
        *_trained_parts(lora, train),
        f"- steps: {card.steps} of {train.get('steps')} · resolution {train.get('resolution')} · "
        f"batch {train.get('batch_size')} × accum {train.get('grad_accum')} · lr {train.get('lr')} "
        f"({train.get('lr_scheduler', 'constant')}) · seed {train.get('seed')} · {train.get('precision')}",
    ]
    if card.final_loss is not None:
        lines.append(f"- final loss (smoothed): {card.final_loss:.4f}")
    lines += [f"- {key}: {value}" for key, value in card.extra.items()]
    lines += _sessions_section(card.sessions)
    if has_grid:
        lines += ["", "## Samples", "", "Base model (left) and with this LoRA (right), same prompt and seed:", ""]
        lines += [f"![base vs LoRA]({GRID_FILE})"]
    if has_loss_curve:
        lines += ["", "## Loss", "", "Train loss (smoothed) and validation loss over every session:", ""]
        lines += [f"![loss curve]({LOSS_FILE})"]
    lines += _tools_section(kohya_file, text_encoders=bool(lora.get("text_encoder")))
    lines += _usage_section(base, kohya_file)
    return "\n".join(lines) + "\n"


def _trained_parts(lora: dict, train: dict) -> list[str]:
    """Which parts were trained, and at which learning rates."""
    unet = f"- trained: UNet LoRA at lr {train.get('lr')}"
    if not lora.get("text_encoder"):
        return [unet + "; text encoders frozen (not trained)"]
    eight_bit = ", frozen weights in 8-bit" if lora.get("text_encoder_8bit") else ""
    return [
        unet + f"; both text encoders (CLIP-L, CLIP-G) LoRA at lr {lora.get('text_encoder_lr') or train.get('lr')}",
        f"- text-encoder LoRA: rank {lora.get('text_encoder_rank') or lora.get('rank')}, "
        f"alpha {lora.get('text_encoder_alpha') or lora.get('alpha')}, "
        f"targets {', '.join(lora.get('text_encoder_targets', []))}{eight_bit}",
    ]


def _sessions_section(sessions: tuple[dict, ...]) -> list[str]:
    if not sessions:
        return []
    lines = ["", "## Sessions", "", "| # | platform | GPU | steps | ended |", "|---|---|---|---|---|"]
    for i, s in enumerate(sessions, 1):
        steps = f"{s['step_from']}→{s['step_to']}" if "step_from" in s and "step_to" in s else s.get("steps", "?")
        ended = s.get("reason", s.get("ended", "?"))
        ended = "killed" if ended == "running" else ended  # recorded mid-session by a checkpoint; never logged an end
        lines.append(f"| {i} | {s.get('platform', '?')} | {s.get('gpu', '?')} | {steps} | {ended} |")
    return lines


def _usage_section(base: str, kohya_file: str | None) -> list[str]:
    lines = [
        "",
        "## Use",
        "",
        "diffusers:",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        "",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
        'pipe.load_lora_weights("path/to/this/folder")  # reads pytorch_lora_weights.safetensors',
        'image = pipe("your prompt").images[0]',
        "```",
    ]
    if kohya_file:
        lines += [
            "",
            f"ComfyUI: copy `{kohya_file}` to `ComfyUI/models/loras/` and use a *Load LoRA* node (model and CLIP).",
            f"AUTOMATIC1111 / Forge: copy `{kohya_file}` to `models/Lora/` and add "
            f"`<lora:{kohya_file.removesuffix('.safetensors')}:1>` to the prompt.",
        ]
    lines += ["", f"`{DIFFUSERS_FILE}` has the LoRA scale (alpha / rank) folded into its weights: load it at scale 1."]
    return lines


def _tools_section(kohya_file: str | None, *, text_encoders: bool) -> list[str]:
    """Which file each tool reads: ComfyUI does not apply the UNet part of the diffusers-named file."""
    kohya = f"`{kohya_file}`" if kohya_file else "none (no kohya file for DoRA: use diffusers)"
    lines = [
        "",
        "## Which file for which tool",
        "",
        "| tool | file |",
        "|---|---|",
        f"| diffusers (`load_lora_weights`) | `{DIFFUSERS_FILE}` |",
        f"| ComfyUI, AUTOMATIC1111 / Forge | {kohya} |",
        "",
        f"`{DIFFUSERS_FILE}` uses diffusers' module names: ComfyUI does not apply its UNet part.",
    ]
    if text_encoders:
        lines += [
            "This LoRA trained both text encoders: ComfyUI's model-only node (*LoraLoaderModelOnly*) drops that "
            "part, so use *Load LoRA* (model and CLIP) or the result will not match the samples.",
        ]
    return lines


def commit_final(store: Any, profile: Any, lora_sd: dict[str, torch.Tensor], **final: Any) -> None:
    """Write final/ (`write_final`) through the run's committed-folder store (runner.checkpoint.store) and
    commit it, replacing an earlier export. `final`: write_final's keyword arguments."""
    store.build(
        "final", lambda local: write_final(profile, store.run, lora_sd, local, **final), {"step": final["steps"]}
    )
    store.commit("final", replace=True)


def write_final(
    profile: Any, run: str, lora_sd: dict[str, torch.Tensor], out_dir: Path, *, steps: int,
    sessions: list[dict], device: str, unet: Any = None, bus: Any = None, loss_curve: Path | None = None,
) -> list[Path]:  # fmt: skip
    """final/: the diffusers and kohya LoRA files, the model card and, when they can be drawn, the sample
    grid and the loss curve (`loss_curve`, drawn by the session from every session's logs).

    The grid is best effort: a failure to draw it is a Warning, never a lost run."""
    from runner import events
    from runner.sample import draw_samples

    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / "samples.png"
    try:
        # with the training UNet: its adapter as it is, and the text encoders' LoRA (if any) from lora_sd
        sampled = lora_sd if unet is None else {k: v for k, v in lora_sd.items() if k.startswith("text_encoder")}
        draw_samples(profile, sampled or None, grid, device=device, unet=unet, step=steps)
    except (RuntimeError, OSError, ValueError) as exc:  # sampling must never cost the trained LoRA
        log.warning("sample grid failed: %s", exc)
        if bus is not None:
            bus.emit(events.Warning(f"sample grid not drawn: {exc}", kind="samples"))
    card = CardInfo(name=run, steps=steps, sessions=tuple(sessions), sample_grid=str(grid) if grid.exists() else "",
                    loss_curve=str(loss_curve) if loss_curve else "")  # fmt: skip
    return export_lora(lora_sd, profile.lora, out_dir, profile_dict=profile.to_dict(), card=card)
