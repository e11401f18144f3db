"""The field case of issue 16, measured: a mixed-aspect image folder on a full-size SDXL under `relay train`.

  python3 bench/t4_field.py model DIR        a diffusers folder of the full SDXL base 1.0 architecture with
                                             random fp16 weights (unet, vae, both text encoders, tokenizers)
  python3 bench/t4_field.py images DIR [N]   N images (default 36) in six aspect ratios, .txt captions
  python3 bench/t4_field.py train JSON -- ARGS…
                                             `relay ARGS…` in this process (the real CLI, session, cache, fit
                                             and trainer), recording each optimizer step and the events into
                                             JSON: step times and batch shapes, each shape's compile and
                                             capture time, back-offs, peak reserved GPU memory, and the time
                                             from this process's start to the end of its first step

The recorder wraps TrainingRun.step (timing only: the step itself is untouched) and the event bus; it
changes nothing Relay does. bench/t4_field.sh runs these under the T4 emulation.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: a session's clock starts with the process

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# (width, height) of the field report's six aspect ratios, six images each
SIZES = ((1024, 1024), (832, 1216), (1216, 832), (768, 1344), (1344, 768), (900, 1100))
GIB = 2**30


def build_model(folder: Path) -> None:
    """The full SDXL architecture, random fp16 weights, saved as a diffusers folder (skipped when present)."""
    if (folder / "unet" / "config.json").is_file():
        print(f"model folder {folder} exists", flush=True)
        return
    import torch

    from runner.train.testmodels import build_random_sdxl

    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init on the GPU takes seconds
    save_parts(build_random_sdxl(device=device, dtype=torch.float16), folder)
    print(f"model folder {folder} written", flush=True)


def save_parts(parts, folder: Path) -> None:
    """SDXLParts as a diffusers folder (safetensors), the layout model.base accepts."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(parts, name).save_pretrained(folder / name)  # safetensors by default in diffusers and transformers
        setattr(parts, name, None)
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.tokenizer_2.save_pretrained(folder / "tokenizer_2")


def build_images(folder: Path, count: int = 36, scale: float = 1.0, square: bool = False) -> None:
    """`count` JPEG images cycling through SIZES (times `scale`), or all square (the Naruto set's shape), each
    with a caption file."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = (max(8, round(n * scale)) for n in (SIZES[0] if square else SIZES[i % len(SIZES)]))
        image = Image.new("RGB", (width, height), (30 + 37 * i % 200, 90, 160))
        pen = ImageDraw.Draw(image)
        pen.ellipse((width * 0.2, height * 0.2, width * 0.7, height * 0.8), fill=(230, 200 - 5 * i % 150, 40))
        image.save(folder / f"img{i:03d}.jpg", quality=90)
        (folder / f"img{i:03d}.txt").write_text(f"an orange shape number {i}, {width}x{height}")
    print(f"{count} images in {folder}", flush=True)


class Recorder:
    """Per-step timings and the events of one `relay` command in this process."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.events: list[dict] = []
        self.first_step_end: float | None = None

    def install(self) -> None:
        from dataclasses import asdict

        from runner import events
        from runner.train import run

        recorder, step, emit = self, run.TrainingRun.step, events.EventBus.emit

        def timed_step(tr, index: int):
            result = step(tr, index)
            recorder.on_step(tr, index, result)
            return result

        def recorded_emit(bus, event) -> None:
            if isinstance(event, RECORDED):
                recorder.events.append({"event": type(event).__name__, "at_s": since_start(), **asdict(event)})
            emit(bus, event)

        RECORDED = (
            events.ShapeReady,
            events.Planned,
            events.Warning,
            events.SessionEnded,
            events.SessionStarted,
            events.CheckpointStaged,
            events.CheckpointCommitted,
            events.CacheProgress,
        )
        run.TrainingRun.step = timed_step
        events.EventBus.emit = recorded_emit

    def on_step(self, tr, index: int, result) -> None:
        import torch

        if self.first_step_end is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first_step_end = since_start()
        reserved = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None
        self.steps.append(
            {
                "step": index,
                "shape": tr.trainer._shape,
                "seconds": round(result.seconds, 4),
                "setup_s": round(result.setup_s, 2),
                "plan": tr.plan.describe(),
                "peak_reserved_gib": None if reserved is None else round(reserved, 3),
            }
        )

    def summary(self, exit_code: int) -> dict:
        import torch

        cuda = torch.cuda.is_available()
        seen: set[str] = set()
        after_first: dict[str, list[float]] = {}
        for row in self.steps:
            if row["shape"] in seen and row["setup_s"] == 0:
                after_first.setdefault(row["shape"], []).append(row["seconds"])
            seen.add(row["shape"])
        every = [s for values in after_first.values() for s in values]
        wall = since_start()
        in_steps = sum(row["seconds"] for row in self.steps)
        staged = [e["stage_s"] for e in self.events if e["event"] == "CheckpointStaged"]
        cache = [e["at_s"] for e in self.events if e["event"] == "CacheProgress"]
        return {
            "exit_code": exit_code,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "steps": len(self.steps),
            # training's peak (the last step's reading); the process's own includes the final sample grid
            "peak_reserved_gib": self.steps[-1]["peak_reserved_gib"] if self.steps else None,
            "peak_reserved_gib_process": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
            "peak_allocated_gib_process": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
            "step_s_median_after_first_per_shape": round(statistics.median(every), 4) if every else None,
            "step_s_median_by_shape": {k: round(statistics.median(v), 4) for k, v in after_first.items()},
            "setup_s_by_shape": self.setup_by_shape(),  # the fit's probe included (it compiles the largest)
            "start_to_first_step_s": self.first_step_end,
            "process_wall_s": wall,  # process start to this summary (after the session's end)
            "seconds_in_steps": round(in_steps, 2),
            "share_in_steps": round(in_steps / wall, 4) if wall else None,
            "share_in_steps_after_first_step": round(in_steps / (wall - self.first_step_end), 4)
            if self.first_step_end and wall > self.first_step_end
            else None,
            "checkpoints_staged": len(staged),
            "checkpoint_stage_s": staged,  # what a checkpoint blocks the step loop for (copy to host memory)
            "checkpoint_upload_s": [e["upload_s"] for e in self.events if e["event"] == "CheckpointCommitted"],
            "cache_progress_s": [cache[0], cache[-1]] if cache else None,  # first and last cache progress event
            "back_offs": [e["reason"] for e in self.events if e["event"] == "Planned" and e.get("reason")],
            "final_plan": self.steps[-1]["plan"] if self.steps else None,
            "step_rows": self.steps,
            "events": self.events,
        }

    def setup_by_shape(self) -> dict[str, float]:
        """Seconds each batch shape's first micro-batches took (compile and capture), summed over the fit's
        probe and the trainer (and again after a back-off that recaptures)."""
        totals: dict[str, float] = {}
        for event in self.events:
            if event["event"] == "ShapeReady":
                totals[event["shape"]] = round(totals.get(event["shape"], 0.0) + event["seconds"], 2)
        return totals


def since_start() -> float:
    return round(time.time() - PROCESS_START, 2)


def train(out: Path, argv: list[str]) -> int:
    recorder = Recorder()
    recorder.install()
    from runner.cli import main

    code = 1
    try:
        code = main(argv)
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(recorder.summary(code), indent=1))
        brief = {k: v for k, v in recorder.summary(code).items() if k not in ("step_rows", "events")}
        print(f"t4_field {out.name}: {json.dumps(brief)}", flush=True)
    return code


def main(args: list[str]) -> int:
    if len(args) >= 2 and args[0] == "model":
        build_model(Path(args[1]))
        return 0
    if len(args) >= 2 and args[0] == "images":
        build_images(
            Path(args[1]),
            int(args[2]) if len(args) > 2 else 36,
            float(args[3]) if len(args) > 3 else 1.0,
            square=len(args) > 4 and args[4] == "square",
        )
        return 0
    if len(args) >= 3 and args[0] == "train" and args[2] == "--":
        return train(Path(args[1]), args[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
