"""`relay compare`: the variants of an experiment (or any runs) side by side, written into the store.

Owns: gathering each run's results from storage alone (steps, GPU hours and sessions from its session
history, trainable parameters and file size from final/'s LoRA file, train and validation loss from the
TensorBoard files every session stored), and writing them as PREFIX/compare/: `losses.png` (every run's
smoothed train loss as a line, its validation loss as dots, one colour per run), `table.md` (the table)
and, where a model can run (a GPU, or the tiny model on a CPU), `grid.png`: a row per run under the base
model's row, a column per prompt, same seeds and sampler (runner.sample draws the images).

Validation loss is computed by the trainer at fixed noise and fixed timesteps per held-out example, at
every checkpoint, the last one included, so the runs compare exactly; compare needs no GPU for it.

Must not: train, or change a run.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from runner.errors import StorageError, UsageError
from runner.experiment import list_experiments, read_record
from runner.losscurve import LossHistory, read_history, smooth
from runner.report import read_status
from runner.storage import Storage

FINAL_LORA = "final/pytorch_lora_weights.safetensors"
SIZE_PX = (900, 460)
MARGIN_PX = (64, 40, 16, 40)
PALETTE = ((31, 90, 180), (214, 96, 30), (44, 160, 44), (200, 40, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (90, 90, 90), (188, 189, 34), (23, 190, 207))  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    """One row of the table, and its curves."""

    label: str
    run: str
    step: int = 0
    target: int = 0
    gpu_hours: float = 0.0
    sessions: int = 0
    params: int | None = None
    file_bytes: int | None = None
    val_loss: float | None = None
    history: LossHistory = LossHistory()
    failed: str = ""

    @property
    def complete(self) -> bool:
        return self.params is not None and not self.failed


def runs_to_compare(storage: Storage, experiment: str | None, runs: Sequence[str]) -> tuple[str, list[tuple[str, str]], dict[str, str]]:  # fmt: skip
    """(where compare/ goes, [(label, run)], {label: failure}). An experiment's variants in declared order."""
    if runs:
        return "", [(run, run) for run in runs], {}
    if experiment is None:
        found = list_experiments(storage)
        if len(found) != 1:
            hint = f"experiments there: {', '.join(found)}" if found else "or name the runs: relay compare RUN RUN"
            raise UsageError(f"{storage.url}: say which experiment to compare (--experiment NAME)", hint=hint)
        experiment = found[0]
    record = read_record(storage, experiment)
    if record is None or not record.variants:
        raise UsageError(f"{storage.url}: no experiment named {experiment!r} (no {experiment}/experiment.json)",
                         hint="train it first: relay train --profile PROFILE_WITH_VARIANTS --storage URL")  # fmt: skip
    return experiment, list(record.variants), dict(record.failed)


def gather(storage: Storage, label: str, run: str, work: Path, failed: str = "") -> RunResult:
    """What the table and the plot show of one run, read from storage (a run never started: zeros)."""
    try:
        status = read_status(storage, run)
    except UsageError:
        return RunResult(label, run, failed=failed or "not started")
    sessions = [s for s in status.sessions if s.get("steps", 0) or s.get("reason") != "budget"]
    gpu_h = sum(float(s.get("wall_s", 0.0)) * max(1, int(s.get("gpu_count", 1) or 1)) for s in sessions) / 3600
    params = size = None
    if status.complete:
        local = work / run / "lora.safetensors"
        local.parent.mkdir(parents=True, exist_ok=True)
        storage.get(f"{run}/{FINAL_LORA}", local)
        params, size = safetensors_params(local), local.stat().st_size
    history = _history(storage, run, work / run / "logs")
    final_val = [v for step, v in history.val if step == status.step]  # at the final step only, else none
    val = final_val[-1] if final_val and status.complete else None
    return RunResult(label, run, status.step, status.target, gpu_h, len(sessions), params, size, val, history,
                     failed)  # fmt: skip


def safetensors_params(path: Path) -> int:
    """The number of values in a safetensors file, from its JSON header (no torch)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _history(storage: Storage, run: str, logs_root: Path) -> LossHistory:
    for key in storage.list(f"{run}/logs"):
        local = logs_root / key.removeprefix(f"{run}/logs/")
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.get(key, local)
    return read_history(logs_root)


# ---------------------------------------------------------------- the table


def table(results: Sequence[RunResult]) -> str:
    """The markdown table: one row per run."""
    head = "| variant | steps | GPU hours | sessions | trainable params | file size | final validation loss |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        steps = f"{r.step} / {r.target}" + ("" if r.complete or r.failed else " (training)")
        if r.failed:
            steps = f"failed: {r.failed.splitlines()[0][:120]}"
        params = f"{r.params:,}" if r.params is not None else "—"
        size = f"{r.file_bytes / 2**20:.1f} MiB" if r.file_bytes is not None else "—"
        val = f"{r.val_loss:.5f}" if r.val_loss is not None else "—"
        lines.append(f"| {r.label} | {steps} | {r.gpu_hours:.2f} | {r.sessions} | {params} | {size} | {val} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the loss plot


def draw_losses(results: Sequence[RunResult], out_path: Path, *, title: str = "loss") -> Path:
    """Every run's smoothed train loss (line) and validation loss (dots joined), one colour per run."""
    curves = [(r, PALETTE[i % len(PALETTE)]) for i, r in enumerate(results) if not r.history.is_empty]
    if not curves:
        raise ValueError("no loss values to draw")
    points = [(s, v) for r, _ in curves for s, v in (*smooth(r.history.train), *r.history.val) if math.isfinite(v)]
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    left, top, right, bottom = MARGIN_PX
    w, h = SIZE_PX[0] - left - right, SIZE_PX[1] - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        fx = (step - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (value - y0) / (y1 - y0) if y1 > y0 else 0.5
        return left + fx * w, top + (1 - fy) * h

    image = Image.new("RGB", SIZE_PX, "white")
    d = ImageDraw.Draw(image)
    d.rectangle((left, top, left + w, top + h), outline=(0, 0, 0))
    for i in range(5):
        step, value = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        x, y = xy(step, value)
        d.text((x, top + h + 6), f"{step:.0f}", fill=(0, 0, 0), anchor="ma")
        d.text((left - 6, y), f"{value:.3g}", fill=(0, 0, 0), anchor="rm")
    d.text((left + w / 2, SIZE_PX[1] - 4), "step · line: train loss (smoothed) · dots: validation loss",
           fill=(0, 0, 0), anchor="md")  # fmt: skip
    d.text((left, 4), title, fill=(0, 0, 0))
    x_legend = left
    for r, colour in curves:
        train = [xy(s, v) for s, v in smooth(r.history.train) if math.isfinite(v)]
        if len(train) > 1:
            d.line(train, fill=colour, width=2)
        val = [xy(s, v) for s, v in r.history.val if math.isfinite(v)]
        if len(val) > 1:
            d.line(val, fill=colour, width=1)
        for x, y in val:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.line((x_legend, 24, x_legend + 16, 24), fill=colour, width=3)
        d.text((x_legend + 20, 18), r.label, fill=(0, 0, 0))
        x_legend += 36 + d.textlength(r.label)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return out_path


# ---------------------------------------------------------------- the whole comparison

GridMaker = Callable[[list[tuple[str, str]], Path], Path | None]
"""Draws the image grid of (label, run) pairs at the path given; None when it cannot here (no model)."""


def compare(storage: Storage, *, experiment: str | None = None, runs: Sequence[str] = (), out_dir: Path | None = None,
            grid: GridMaker | None = None) -> dict[str, Path]:  # fmt: skip
    """Write compare/ (losses.png, table.md, grid.png when `grid` draws one) into the store and `out_dir`;
    returns the local files by name."""
    prefix, pairs, failures = runs_to_compare(storage, experiment, runs)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="relay-compare-"))
    work = out_dir / ".runs"
    results = [gather(storage, label, run, work, failures.get(label, "")) for label, run in pairs]
    files: dict[str, Path] = {}
    name = prefix or "runs"
    (out_dir / "table.md").write_text(f"# {name}: variants compared\n\n" + table(results))
    files["table.md"] = out_dir / "table.md"
    try:
        files["losses.png"] = draw_losses(results, out_dir / "losses.png", title=f"{name}: loss")
    except ValueError:
        pass  # no run has logged a loss yet
    if grid is not None:
        done = [(r.label, r.run) for r in results if r.complete]
        path = grid(done, out_dir / "grid.png") if done else None
        if path is not None:
            files["grid.png"] = path
    key = f"{prefix}/compare" if prefix else "compare"
    for filename, path in files.items():
        try:
            storage.put(path, f"{key}/{filename}")
        except StorageError as exc:
            raise StorageError(
                f"compare/{filename} not stored: {exc}", hint=f"the local copy is in {out_dir}"
            ) from None
    return files


# ---------------------------------------------------------------- the image grid (a model runs here)


def model_grid(storage: Storage, device: str | None = None) -> GridMaker:
    """A GridMaker that samples every run's newest LoRA with the first run's prompts, seed and sampler on
    `device` (None: this machine's GPU, else the CPU); on a CPU only when every run's model is the tiny one
    (a full SDXL grid needs a GPU)."""

    def make(pairs: list[tuple[str, str]], out_path: Path) -> Path | None:
        nonlocal device
        if device is None:
            from runner.train.run import Placement

            device = Placement.detect().device
        profiles = [(label, run, _profile_of(storage, run)) for label, run in pairs]
        if not device.startswith("cuda") and any(p.model.base != "tiny" for _, _, p in profiles):
            return None
        from runner.sample import prompt_images
        from runner.samplegrid import make_grid
        from runner.train.loading import load_parts
        from runner.train.run import unet_dtype

        cfg, resolution = profiles[0][2].sample, profiles[0][2].train.resolution
        parts_of: dict[tuple, object] = {}
        base_row: list[Image.Image] = []
        rows: list[list[Image.Image]] = []
        for _, run, profile in profiles:
            key = (profile.model, unet_dtype(profile, device))
            if key not in parts_of:
                parts_of[key] = load_parts(profile.model, unet=True, text=True, vae=True, device="cpu", dtype=key[1])
            images = prompt_images(parts_of[key], _newest_lora(storage, run, out_path.parent / ".runs" / run),
                                   cfg.prompts, cfg.seed, cfg.inference_steps, cfg.guidance, resolution,
                                   lora_cfg=profile.lora, device=device, cpu_offload=device.startswith("cuda"))  # fmt: skip
            base_row = base_row or [pair[0] for pair in images]
            rows.append([pair[1] for pair in images])
        grid = make_grid([base_row, *rows], list(cfg.prompts), ["base model", *(label for label, _, _ in profiles)])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out_path)
        return out_path

    return make


def _profile_of(storage: Storage, run: str):
    from runner.profile import build_profile
    from runner.state import read_run_info

    info = read_run_info(storage, run, missing_ok=False)
    raw = {k: v for k, v in info.profile.items() if k != "variant"}
    return build_profile(raw, source=f"{run}/run.json")


def _newest_lora(storage: Storage, run: str, work: Path):
    from safetensors.torch import load_file

    from runner.checkpoint.layout import CHECKPOINT_DIR, committed_steps, step_dir_name

    steps = committed_steps(storage, run)
    if not steps:
        raise UsageError(f"run {run!r} has no committed checkpoint to sample")
    local = work / "newest-lora.safetensors"
    local.parent.mkdir(parents=True, exist_ok=True)
    storage.get(f"{run}/{CHECKPOINT_DIR}/{step_dir_name(steps[-1])}/lora.safetensors", local)
    return load_file(str(local))
