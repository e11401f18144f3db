"""One training step, broken down: where the time of a `relay train` step goes, by kind of kernel.

Builds the same run `relay bench` builds (full-size SDXL with random weights, generated data, the real
cache → fit → Trainer path; `--model tiny` for a CPU check of this script), times the steps, then
profiles steps with torch.profiler and sorts every GPU kernel into: attention, convolutions (and the
layout transposes cuDNN adds around them), the UNet's frozen GEMMs, LoRA's rank-r GEMMs (found from the
shapes of the aten::mm/addmm calls that launched them), casts, fused elementwise/norm kernels (Triton),
other elementwise, the optimizer (AdamW, grad-norm, unscale), and launch gaps (step wall time with no
kernel running). Prints a table and writes a JSON with the numbers.

On the device machine, under the T4 emulation (carry .t4):
    bash .t4/t4-emulate.sh python3 bench/profile_step.py --resolution 1024 --json $OUT/profile_1024.json
On CPU (kernels are CPU ops there; checks the script, not the figures):
    python3 bench/profile_step.py --model tiny --resolution 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATEGORIES = (
    ("attention", ("fmha", "attention", "flash", "cutlassf", "cutlassb", "mem_eff", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "unscale", "amp_update", "norm_kernel")),
    ("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("convolutions", ("conv", "cudnn", "implicit", "fprop", "dgrad", "wgrad", "winograd")),
    ("fused elementwise/norm (Triton)", ("triton",)),
    ("GEMMs", ("gemm", "cutlass", "cublas", "xmma", "sm90", "sm80", "sm75", "ampere", "turing", "gemv", "splitk")),
    ("norms (eager)", ("group_norm", "layer_norm", "groupnorm", "layernorm", "welford")),
)
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_addmm_activation")
CAST_OPS = ("aten::_to_copy", "aten::to", "aten::copy_")


def category(kernel: str) -> str:
    low = kernel.lower()
    for name, keys in CATEGORIES:
        if any(k in low for k in keys):
            return name
    return "other elementwise"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl-random")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--checkpointing", default="off")
    p.add_argument("--compile", default="auto")
    p.add_argument("--text-encoder", action="store_true")
    p.add_argument("--text-encoder-8bit", action="store_true")
    p.add_argument("--targets", default="")
    p.add_argument("--vram-gib", type=float, default=15.0)
    p.add_argument("--steps", type=int, default=8, help="timed steps (graph replays when graphs are on)")
    p.add_argument("--no-eager-profile", action="store_true", help="skip the compiled-eager (no graph) profile")
    p.add_argument("--channels-last", default="off", choices=["on", "off"], help="the UNet's convolutions in NHWC")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def build(args):
    import torch

    from runner import events
    from runner.bench import GIB, bench_profile
    from runner.train.cache import build_cache
    from runner.train.run import Placement, TrainingRun

    profile = bench_profile(args)
    placement = Placement.detect()
    if placement.device.startswith("cuda") and args.vram_gib:
        total = torch.cuda.get_device_properties(placement.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_gib * GIB / total), placement.device)
    tmp = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    bus = events.EventBus()
    build_cache(profile, tmp / "cache", bus=bus, device=placement.device)
    return TrainingRun(profile, tmp / "cache", placement=placement, bus=bus, gpu_name=placement.device)


def sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def time_steps(tr, first: int, count: int, cuda: bool) -> list[float]:
    times = []
    for step in range(first, first + count):
        sync(cuda)
        t0 = time.perf_counter()
        tr.step(step)
        sync(cuda)
        times.append(time.perf_counter() - t0)
    return times


def profile_steps(tr, first: int, count: int, cuda: bool, rank: int) -> dict:
    """Profile `count` steps; per-step seconds by category, LoRA and casts by op shape, and launch gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(cuda)
    wall0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for step in range(first, first + count):
            tr.step(step)
        sync(cuda)
    wall = (time.perf_counter() - wall0) / count
    events = prof.events()
    device_kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in events if e.device_type == device_kind and cuda]
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    intervals = []
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
        intervals.append((e.time_range.start, e.time_range.end))
    busy = _union(intervals)
    lora_us, cast_us, mm_us = 0.0, 0.0, 0.0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        dev = _self_device_us(e) if cuda else e.self_cpu_time_total
        if e.name in MM_OPS:
            mm_us += dev
            if any(rank in shape for shape in (e.input_shapes or []) if isinstance(shape, list)):
                lora_us += dev
        elif e.name in CAST_OPS:
            cast_us += dev
    n_kernels = len(kernels) / count
    if not cuda:  # no kernels: the CPU ops' own time stands in (a check of this script only)
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
                by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {
        "wall_s_per_step": round(wall, 4),
        "kernels_per_step": round(n_kernels),
        "gpu_busy_s_per_step": round(busy / 1e6 / count, 4),
        "launch_gaps_s_per_step": round(max(0.0, wall - busy / 1e6 / count), 4) if cuda else None,
        "by_category_s_per_step": {k: round(v / 1e6 / count, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "lora_gemms_s_per_step": round(lora_us / 1e6 / count, 4),
        "all_mm_ops_s_per_step": round(mm_us / 1e6 / count, 4),
        "casts_s_per_step": round(cast_us / 1e6 / count, 4),
        "top_kernels_s_per_step": [(name[:120], round(us / 1e6 / count, 5)) for name, us in top],
    }  # fmt: skip


def _self_device_us(e) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(e, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    start = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start
    return total


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(argv)
    from runner.train import prepare

    prepare.CHANNELS_LAST = args.channels_last == "on"
    t0 = time.perf_counter()
    tr = build(args)
    cuda = tr.trainer.device.type == "cuda"
    out: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "compiled": tr.trainer.compiled or "", "channels_last": tr.trainer.channels_last, "checkpointing": tr.plan.gradient_checkpointing,
                 "setup_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.step(0)
    sync(cuda)
    out["first_step_s"] = round(time.perf_counter() - t0, 1)
    tr.step(1)
    times = time_steps(tr, 2, args.steps, cuda)
    out["step_s_median"] = round(statistics.median(times), 4)
    out["step_s_all"] = [round(t, 4) for t in times]
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    step = 2 + args.steps
    out["profile_as_trained"] = profile_steps(tr, step, 2, cuda, args.rank)
    step += 2
    trainer = tr.trainer
    if cuda and trainer.graphs is not None and not args.no_eager_profile:
        # the same compiled blocks without the graph: each kernel's launching op (and its shapes) is visible
        trainer.release_graphs()
        graphs, trainer.graphs = trainer.graphs, None
        tr.step(step)  # warm (allocations outside the pool)
        out["profile_compiled_eager"] = profile_steps(tr, step + 1, 2, cuda, args.rank)
        trainer.graphs = graphs
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out), file=sys.stderr)
    return 0


def table(out: dict) -> str:
    lines = [f"{out['device']}: {out['args']['resolution']} px, compiled={out['compiled']}, "
             f"checkpointing={out['checkpointing']}: {out['step_s_median']} s/step, "
             f"peak reserved {out.get('peak_reserved_gib')} GiB"]  # fmt: skip
    for key in ("profile_as_trained", "profile_compiled_eager"):
        prof = out.get(key)
        if not prof:
            continue
        lines.append(f"-- {key}: wall {prof['wall_s_per_step']} s, GPU busy {prof['gpu_busy_s_per_step']} s, "
                     f"gaps {prof['launch_gaps_s_per_step']} s, {prof['kernels_per_step']} kernels")  # fmt: skip
        for name, s in prof["by_category_s_per_step"].items():
            lines.append(f"   {name:<34} {s:8.4f} s")
        lines.append(f"   {'of the GEMMs: LoRA (rank-r shapes)':<34} {prof['lora_gemms_s_per_step']:8.4f} s "
                     f"(all mm ops {prof['all_mm_ops_s_per_step']} s); casts {prof['casts_s_per_step']} s")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
