"""`relay bench`'s report: the figures one benchmark measured, and how they are shown.

Owns: `BenchReport` (what `relay bench --json` prints, field for field), `print_report` (the table) and
`log_partial` (the figures so far on stderr, so a failure in a later phase loses nothing measured).

Must not: measure anything (runner/bench.py does) or import torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class BenchReport:
    device: str
    model: str
    resolution: int
    micro_batch: int
    grad_accum: int
    world: int
    rank: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    vram_cap_gib: float | None
    targets: str = ""  # the UNet LoRA's target modules, comma-separated
    text_encoder: str = ""  # "" UNet LoRA only; "fp16"/"bf16"/"8bit": LoRA on both text encoders, frozen in that
    compiled: str = ""  # the torch.compile mode used, "" when eager
    first_step_s: float = 0.0  # the first step after the fit: includes torch.compile's work when compiled
    trainable_params: int = 0
    cache_build_s: float = 0.0
    setup_s: float = 0.0  # UNet load + LoRA + memory plan
    step_s_median: float = 0.0
    step_s_all: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    step_tflop: float | None = None
    achieved_tflops: float | None = None
    matmul_fp16_tflops: float | None = None
    mfu_vs_matmul: float | None = None
    checkpoint_save_s: float = 0.0  # blocking: the LoRA and AdamW state copied to host memory
    checkpoint_write_s: float = 0.0  # in the upload worker, while training goes on: files written and hashed
    floor_step_s: float | None = None
    overhead_vs_floor_pct: float | None = None
    import_s: float | None = None
    resume_load_s: float | None = None
    resume_to_first_step_s: float | None = None
    notes: list[str] = field(default_factory=list)


def log_partial(report: BenchReport) -> None:
    """The figures so far, on stderr, so a failure in a later phase loses nothing already measured."""
    print(f"relay-bench partial: {json.dumps(asdict(report))}", file=sys.stderr, flush=True)


def print_report(r: BenchReport) -> None:
    rows = [
        ("device", f"{r.device}" + (f" (capped at {r.vram_cap_gib} GiB)" if r.vram_cap_gib else "")),
        ("plan", f"{r.resolution} px, micro-batch {r.micro_batch} × accum {r.grad_accum} × {r.world} GPU, "
                 f"checkpointing {'on' if r.gradient_checkpointing else 'off'}, {r.precision}, {r.optimizer}"
                 f"{f', compiled ({r.compiled})' if r.compiled else ''}"),
        ("LoRA params", f"{r.trainable_params / 1e6:.2f} M (rank {r.rank}, {r.targets})"
                        + (f", text encoders too ({r.text_encoder})" if r.text_encoder else ", UNet only")),
        ("s/step (median)", f"{r.step_s_median:.3f}  ({r.images_per_s:.2f} images/s)"),
        ("peak VRAM", f"{r.peak_allocated_gib} GiB allocated, {r.peak_reserved_gib} GiB reserved"),
        ("compute", f"{r.step_tflop} TFLOP/step, {r.achieved_tflops} TFLOP/s "
                    f"({r.mfu_vs_matmul} of the {r.matmul_fp16_tflops} TFLOP/s fp16 matmul rate)"),
        ("floor", f"{r.floor_step_s} s/step bare; runner overhead {r.overhead_vs_floor_pct} %"),
        ("first step", f"{r.first_step_s} s (compiling included)" if r.compiled else f"{r.first_step_s} s"),
        ("cache build", f"{r.cache_build_s} s"),
        ("checkpoint save", f"{r.checkpoint_save_s} s blocking, then {r.checkpoint_write_s} s writing in the background"),
        ("resume", f"{r.resume_to_first_step_s} s to first step (import {r.import_s} s, load {r.resume_load_s} s)"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:>16}: {value}")
    for note in r.notes:
        print(f"{'note':>16}: {note}")
