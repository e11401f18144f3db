"""`relay train --profile tiny` as shipped, end to end in a subprocess: artefacts, and "already complete".

The real tiny profile (40 steps, 24 generated images) runs a few minutes on 2 busy CPU cores, so this is slow.
The trainer's own tests prove the loss falls step by step; here the loss is read from what a user sees
(TensorBoard) and only has to fall over the run as a whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = "tiny"
TARGET = 40  # profiles/tiny.toml train.steps


def relay_train(storage: Path, workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runner", "train", "--profile", "tiny", "--storage", str(storage), "--plain",
           "--workdir", str(workdir)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def train_losses(logs: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events_file in logs.rglob("events.out.tfevents.*"):  # one folder per session, or none
        acc = EventAccumulator(str(events_file))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            points.update((e.step, e.value) for e in acc.Scalars("train/loss"))
    return [points[step] for step in sorted(points)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("tiny-run")
    storage, workdir = root / "storage", root / "work"
    return storage, workdir, relay_train(storage, workdir)


@pytest.mark.slow
def test_tiny_profile_trains_to_the_target_and_exports(finished):
    from safetensors.torch import load_file

    storage, workdir, out = finished
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    final = storage / RUN / "final"
    listed = json.loads((final / "COMMIT.json").read_text())["files"]
    for name in ("pytorch_lora_weights.safetensors", f"{RUN}.kohya.safetensors", "README.md", "loss.png"):
        assert name in listed and (final / name).stat().st_size == listed[name]["size"], name
    diffusers_sd = load_file(str(final / "pytorch_lora_weights.safetensors"))
    kohya_sd = load_file(str(final / f"{RUN}.kohya.safetensors"))
    assert diffusers_sd and all(t.isfinite().all() for t in diffusers_sd.values())
    assert any(k.startswith("lora_unet_") for k in kohya_sd), "kohya/ComfyUI key names"
    assert str(TARGET) in (final / "README.md").read_text()
    sessions = [json.loads(line) for line in (storage / RUN / "sessions.jsonl").read_text().splitlines()]
    assert [(s["step_from"], s["step_to"], s["reason"]) for s in sessions] == [(0, TARGET, "completed")]


@pytest.mark.slow
def test_tiny_profile_loss_falls_over_the_run(finished):
    _, workdir, out = finished
    assert out.returncode == 0
    losses = train_losses(workdir / RUN / "logs")
    assert len(losses) == TARGET
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}"


@pytest.mark.slow
def test_second_run_of_a_complete_run_exits_at_once(finished):
    storage, workdir, out = finished
    assert out.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (storage / RUN / "final").iterdir()}
    t0 = time.monotonic()
    again = relay_train(storage, workdir)
    took_s = time.monotonic() - t0
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete" in again.stdout + again.stderr
    assert "warning" not in [line for line in again.stdout.splitlines() if "already complete" in line][0]
    assert f"step 1/{TARGET}" not in again.stdout, "it must not train again"
    assert {p: p.stat().st_mtime_ns for p in (storage / RUN / "final").iterdir()} == before, "final/ is untouched"
    sessions = [json.loads(line) for line in (storage / RUN / "sessions.jsonl").read_text().splitlines()]
    assert sessions[-1]["steps"] == 0 and sessions[-1]["reason"] == "completed"
    assert took_s < 120, f"took {took_s:.0f} s; loading a model or training would"
