"""`relay bench`: the real training path on a full-size random SDXL, measured.

Owns: building a benchmark profile from flags (full-size SDXL architecture with
random weights, generated data, no download), running cache → fit → trainer →
checkpoint through the same code `relay train` uses, and reporting peak VRAM,
median s/step, images/s, achieved TFLOP/s against the GPU's measured fp16
matmul rate, cache build time, checkpoint save time, the time from start to
first step on resume, and a bare UNet LoRA step on the same inputs (the floor
the runner's overhead is judged against). torch is imported inside functions:
the CLI imports this module before it knows the command is `bench`. The report's fields and table are
runner/benchreport.py's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from runner import events
from runner.benchreport import BenchReport, log_partial, print_report
from runner.context import Ranks
from runner.profile import Profile, load_profile

GIB = 2**30
WARMUP_STEPS = 2


def bench_profile(args) -> Profile:
    """The benchmark's profile: sdxl-naruto-t4's settings with the flags applied, generated data."""
    images = max(8, args.batch_size * args.grad_accum * 2)
    overrides = [
        f'model.base="{args.model}"', 'model.vae=""', 'data.source="generated"', f"data.generated_count={images}",
        "data.buckets=false", "data.flip=false", "data.validation_count=0", f"train.resolution={args.resolution}",
        f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}", f"lora.rank={args.rank}",
        f"lora.alpha={2 * args.rank}", f'train.precision="{args.precision}"', f'train.optimizer="{args.optimizer}"',
        f'train.gradient_checkpointing="{args.checkpointing}"', f'train.compile="{args.compile}"',
        "train.steps=100000", "train.warmup_steps=0", *_text_encoder_sets(args), *_target_sets(args),
    ]  # fmt: skip
    return load_profile("sdxl-naruto-t4", overrides)


def _target_sets(args) -> list[str]:
    """--targets a,b,c: LoRA on these UNet modules (e.g. the ResNet convs and feed-forward too)."""
    targets = [t.strip() for t in (getattr(args, "targets", None) or "").split(",") if t.strip()]
    return [f"lora.targets={json.dumps(targets)}"] if targets else []


def _text_encoder_sets(args) -> list[str]:
    """--text-encoder: LoRA on both text encoders too, as sdxl-naruto-t4-te trains them (--text-encoder-8bit:
    their frozen weights in 8-bit)."""
    if not getattr(args, "text_encoder", False) and not getattr(args, "text_encoder_8bit", False):
        return []
    te = load_profile("sdxl-naruto-t4-te").lora
    eight_bit = "true" if getattr(args, "text_encoder_8bit", False) else "false"
    return ["lora.text_encoder=true", f"lora.text_encoder_lr={te.text_encoder_lr}",
            f"lora.text_encoder_8bit={eight_bit}"]  # fmt: skip


def run_bench(args) -> int:
    processes = int(os.environ.get("RELAY_PROCESSES", "0"))
    ranks = Ranks.from_environ(os.environ)
    if processes > 1 and not ranks.launched:
        from runner.launch import launch_distributed

        return launch_distributed(processes)
    report = Bench(args, ranks).run()
    if not ranks.is_main:
        return 0  # rank 0 reports for all
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        print_report(report)
    return 0


class Bench:
    def __init__(self, args, ranks: Ranks) -> None:
        import torch

        from runner.train.run import Placement, init_distributed

        self.args = args
        self.profile = bench_profile(args)
        self.placement = Placement.detect(rank=ranks.rank, world=ranks.world, local_rank=ranks.local_rank)
        init_distributed(self.placement)
        self.cuda = self.placement.device.startswith("cuda")
        if self.cuda and args.vram_gib:
            total = torch.cuda.get_device_properties(self.placement.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_gib * GIB / total), self.placement.device)
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.bus = events.EventBus()

    def run(self) -> BenchReport:

        from runner.train.cache import build_cache
        from runner.train.run import TrainingRun

        a, p = self.args, self.placement
        t0 = time.perf_counter()
        build_cache(self.profile, self.tmp / "cache", bus=self.bus, device=p.device)
        cache_s = time.perf_counter() - t0
        self._reset_peak()
        t0 = time.perf_counter()
        tr = TrainingRun(self.profile, self.tmp / "cache", placement=p, bus=self.bus, gpu_name=p.device)
        setup_s = time.perf_counter() - t0
        plan = tr.plan
        report = BenchReport(
            device=self._device_name(), model=a.model, resolution=a.resolution, micro_batch=plan.micro_batch,
            grad_accum=plan.grad_accum, world=p.world, rank=a.rank, precision=tr.trainer.precision,
            optimizer=a.optimizer, gradient_checkpointing=plan.gradient_checkpointing, vram_cap_gib=a.vram_gib,
            trainable_params=sum(t.numel() for t in tr.trainer.params), cache_build_s=round(cache_s, 2),
            setup_s=round(setup_s, 2), compiled=tr.trainer.compiled or "", text_encoder=_text_encoder_mode(tr),
            targets=",".join(self.profile.lora.targets),
        )  # fmt: skip
        self._time_steps(tr, report)
        self._count_flops(tr, report)
        report.checkpoint_save_s, report.checkpoint_write_s = self._time_save(tr)
        if self.cuda:
            report.floor_step_s = round(floor_step_seconds(tr, a.steps), 4)
            report.overhead_vs_floor_pct = round(100 * (report.step_s_median / report.floor_step_s - 1), 1)
            report.matmul_fp16_tflops = round(matmul_tflops(p.device), 1)
            if report.achieved_tflops:
                report.mfu_vs_matmul = round(report.achieved_tflops / report.matmul_fp16_tflops, 3)
        log_partial(report)
        if not self.args.skip_resume:
            meta = tr.save_state(self.tmp / "ckpt")
            del tr  # its CUDA graphs hold their memory pool until the trainer is gone
            self._free()
            self._time_resume(meta, report)
        return report

    def _save_text_encoders(self, model_dir: Path) -> None:
        """The text encoders and tokenizers beside the UNet, for a resume that trains them too."""
        from runner.train.loading import load_parts
        from runner.train.run import unet_dtype

        parts = load_parts(self.profile.model, unet=False, text=True, vae=False, device="cpu",
                           dtype=unet_dtype(self.profile, self.placement.device))  # fmt: skip
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            getattr(parts, name).save_pretrained(model_dir / name)

    def _sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def _device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.placement.device) if self.cuda else "cpu"

    def _time_steps(self, tr, report: BenchReport) -> None:
        import torch

        self._reset_peak()  # the peak includes the warm-up steps: a CUDA graph allocates while it is captured
        for step in range(WARMUP_STEPS):
            t0 = time.perf_counter()
            tr.step(step)
            if step == 0:
                self._sync()
                report.first_step_s = round(time.perf_counter() - t0, 2)
        times = []
        for step in range(WARMUP_STEPS, WARMUP_STEPS + self.args.steps):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.step(step)
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        report.step_s_all = [round(t, 4) for t in times]
        report.step_s_median = round(statistics.median(times), 4)
        images = report.micro_batch * report.grad_accum * report.world
        report.images_per_s = round(images / report.step_s_median, 3)
        if self.cuda:
            report.peak_allocated_gib = round(torch.cuda.max_memory_allocated() / GIB, 2)
            report.peak_reserved_gib = round(torch.cuda.max_memory_reserved() / GIB, 2)

    def _count_flops(self, tr, report: BenchReport) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        from runner.fit import is_oom_error
        from runner.train.compiling import eager

        counter = FlopCounterMode(display=False)
        graphs, tr.trainer.graphs = tr.trainer.graphs, None  # a replayed graph shows the counter nothing
        try:
            with eager(tr.unet), counter:  # nor do compiled blocks: count the eager aten ops
                tr.trainer.step(10_000)  # the trainer's own step: an OOM here must not back the plan off
        except RuntimeError as exc:  # the counter runs attention unfused: it can need far more memory than training
            if not is_oom_error(exc):
                raise
            report.notes.append("FLOPs not counted: the counter's unfused attention does not fit under the cap")
            return
        finally:
            tr.trainer.graphs = graphs
        report.step_tflop = round(counter.get_total_flops() / 1e12, 2)
        report.achieved_tflops = round(report.step_tflop / report.step_s_median, 1)

    def _time_save(self, tr) -> tuple[float, float]:
        """Seconds a checkpoint blocks training (the snapshot), then seconds writing and hashing it takes
        (the upload worker does that in the background, as in `relay train`)."""
        from runner.checkpoint.manifest import write_manifest

        folder = self.tmp / "ckpt"
        t0 = time.perf_counter()
        snapshot = tr.snapshot_state()
        t1 = time.perf_counter()
        snapshot.write(folder)
        write_manifest(folder, {"bench": True})
        return round(t1 - t0, 4), round(time.perf_counter() - t1, 4)

    def _time_resume(self, meta: dict, report: BenchReport) -> None:
        """A resume as a new session makes it: a fresh process that imports, loads the UNet from disk, adds
        the LoRA and the trainer state and runs the first step. When compiled, that process starts with
        empty inductor and Triton folders and the compile artifacts the run committed, as on a new VM."""
        from runner.train.compiling import compile_artifacts
        from runner.train.loading import load_parts
        from runner.train.run import unet_dtype

        model_dir = self.tmp / "model"
        base = load_parts(self.profile.model, unet=True, text=False, vae=False, device="cpu",
                          dtype=unet_dtype(self.profile, self.placement.device)).unet  # fmt: skip
        base.save_pretrained(model_dir / "unet", safe_serialization=True)  # a base model as users download it
        del base
        if self.profile.lora.text_encoder:
            self._save_text_encoders(model_dir)
        spec = {"sets": [f'model.base="{model_dir}"', *bench_overrides_for(self.profile)], "cache": str(self.tmp / "cache"),
                "ckpt": str(self.tmp / "ckpt"), "meta": meta, "vram_gib": self.args.vram_gib, "artifacts": None}  # fmt: skip
        env = dict(os.environ)
        if report.compiled:
            artifacts = self.tmp / "compile-artifacts.bin"
            artifacts.write_bytes(compile_artifacts() or b"")
            spec["artifacts"] = str(artifacts)
            for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                env[name] = str(self.tmp / f"fresh-{name.lower()}")
        (self.tmp / "resume.json").write_text(json.dumps(spec))
        started = time.time()  # wall clock: the child reports its own, on the same machine
        out = subprocess.run([sys.executable, "-c", "from runner.bench import resume_child; resume_child()",
                              str(self.tmp / "resume.json")], env=env, capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            report.notes.append(f"resume timing failed: {out.stderr.strip().splitlines()[-1:]}")
            return
        child = json.loads(out.stdout.strip().splitlines()[-1])
        report.import_s, report.resume_load_s = child["import_s"], child["load_s"]
        report.resume_to_first_step_s = round(child["first_step_at"] - started, 2)
        if child["compiled"] != report.compiled:
            report.notes.append(f"the resumed process trained with compile={child['compiled'] or 'off'}")

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def bench_overrides_for(profile: Profile) -> list[str]:
    """The --set items that rebuild `profile` apart from its model (for the resume timing)."""
    t, d = profile.train, profile.data
    return [
        'model.vae=""', 'data.source="generated"', f"data.generated_count={d.generated_count}", "data.buckets=false",
        "data.flip=false", "data.validation_count=0", f"train.resolution={t.resolution}",
        f"train.batch_size={t.batch_size}", f"train.grad_accum={t.grad_accum}", f"lora.rank={profile.lora.rank}",
        f"lora.alpha={profile.lora.alpha}", f"lora.targets={json.dumps(list(profile.lora.targets))}",
        f'train.precision="{t.precision}"', f'train.optimizer="{t.optimizer}"',
        f'train.gradient_checkpointing="{t.gradient_checkpointing}"', f'train.compile="{t.compile}"',
        "train.steps=100000", "train.warmup_steps=0",
        *(["lora.text_encoder=true", f"lora.text_encoder_lr={profile.lora.text_encoder_lr}",
           f"lora.text_encoder_8bit={str(profile.lora.text_encoder_8bit).lower()}"] if profile.lora.text_encoder else []),
    ]  # fmt: skip


def _text_encoder_mode(tr) -> str:
    lora = tr.profile.lora
    if not lora.text_encoder:
        return ""
    return "8bit" if lora.text_encoder_8bit else tr.trainer.precision


def resume_child() -> None:
    """The resumed session of `relay bench` (its own process, see Bench._time_resume): prints one JSON line
    with the wall-clock time its first step ended."""
    started = time.perf_counter()
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    from runner.train.compiling import load_compile_artifacts
    from runner.train.run import Placement, TrainingRun

    import_s = time.perf_counter() - started
    placement = Placement.detect()
    if placement.device.startswith("cuda") and spec["vram_gib"]:
        total = torch.cuda.get_device_properties(placement.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["vram_gib"] * GIB / total), placement.device)
    blob = Path(spec["artifacts"]).read_bytes() if spec["artifacts"] else b""
    if blob:
        load_compile_artifacts(blob)  # what a session fetches from the run
    profile = load_profile("sdxl-naruto-t4", spec["sets"])
    t0 = time.perf_counter()
    resumed = TrainingRun(profile, Path(spec["cache"]), placement=placement, bus=events.EventBus(),
                          gpu_name=placement.device)  # fmt: skip
    load_s = time.perf_counter() - t0
    resumed.restore(Path(spec["ckpt"]), spec["meta"])
    resumed.step(0)
    if placement.device.startswith("cuda"):
        torch.cuda.synchronize()
    result = {"first_step_at": time.time(), "import_s": round(import_s, 2), "load_s": round(load_s, 2),
              "compiled": resumed.trainer.compiled or ""}  # fmt: skip
    print(json.dumps(result), flush=True)


def matmul_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """The GPU's fp16 dense matmul rate, the ceiling achieved TFLOP/s are compared with."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def floor_step_seconds(tr, steps: int) -> float:
    """A bare LoRA step: the trainer's own micro-batch (forward, loss, backward; replayed as a CUDA graph
    under graphs) on one fixed cached batch already on the GPU, then the scaler and fused AdamW — none of
    Relay's data loading, RNG draws, events or bookkeeping. The runner is judged against this."""
    import torch

    trainer = tr.trainer
    batch = trainer._batch(0, 0)  # one real micro-batch, built once
    opt = torch.optim.AdamW(trainer.params, lr=1e-6, fused=True)
    scaler = trainer.scaler  # the one _micro scales the loss with

    def one() -> None:
        trainer._zero_grad()
        for _ in range(trainer.grad_accum):
            trainer.graphs.run(batch) if trainer.graphs else trainer._micro(batch)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    for _ in range(WARMUP_STEPS):
        one()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
