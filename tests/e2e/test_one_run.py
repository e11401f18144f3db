"""One run, any GPU count (issue 14, item 4): sessions of one, two (gloo) and one process again continue the
same run, and the final LoRA is the one an uninterrupted one-process run trains, bit for bit.

Why bit for bit is possible here: the run's effective batch (train.batch_size × train.grad_accum = 1 × 2)
is split 1 × 2 on one process and 1 × 1 on each of two; every example, its noise, timestep and flip are
keyed by its slot in the global batch, not by the rank; each micro-batch's loss is divided by a power of
two (the per-process accumulation, then the process count), which is exact in floating point; and two
gradients summed by the all-reduce or accumulated in place are the same sum (a + b = b + a). With more
than two micro-batches per step, or a non-power-of-two split, the sums would be grouped differently and
could differ in the last bits; this test keeps to the case the reduction order allows. All processes run
one CPU thread (OMP_NUM_THREADS=1) so no kernel splits its sums by thread count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import events
from tests.e2e.conftest import REPO, RUN, assert_same_lora, relay_env, sessions

STEPS = 100
SETTINGS = (
    "data.generated_count=4", "data.validation_count=0", "train.resolution=32", "sample.inference_steps=1",
    "train.batch_size=1", "train.grad_accum=2", f"train.steps={STEPS}", "checkpoint.every_min=0.001",
    "dashboard.plain_every_s=0.1",
)  # fmt: skip
FIRST_STOP = 20  # session 1 (one process) ends after this step
SECOND_STOP_FROM = 40  # session 2 (two processes) is sent SIGTERM once its dashboard shows this step


def in_process_session(storage: Path, workdir: Path, *, stop_after: int | None = None) -> tuple[int, list]:
    """One single-process session in this process on one CPU thread; SIGTERM after `stop_after`."""
    import torch

    from runner.context import Options, build_context
    from runner.wiring import wire

    opts = Options(profile="tiny", storage=str(storage), overrides=SETTINGS, plain=True, workdir=str(workdir))
    ctx = build_context(opts)
    seen: list[events.Event] = []

    def on_event(event: events.Event) -> None:
        seen.append(event)
        if stop_after is not None and isinstance(event, events.StepDone) and event.step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # as the platform does; the session finishes this step

    ctx.bus.subscribe(on_event)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return wire(ctx).run(), seen
    finally:
        torch.set_num_threads(threads)


def two_process_session(storage: Path, workdir: Path, log: Path) -> int:
    """A session of two ranks (RELAY_PROCESSES=2, gloo), SIGTERM to the launcher (as a platform ends a
    notebook) once its dashboard shows step SECOND_STOP_FROM; it forwards the signal to both ranks."""
    args = ["train", "--profile", "tiny", "--storage", str(storage), "--workdir", str(workdir), "--plain"]
    for item in SETTINGS:
        args += ["--set", item]
    env = relay_env({"RELAY_PROCESSES": "2", "OMP_NUM_THREADS": "1"})
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if shown_step(log.read_text(errors="replace")) >= SECOND_STOP_FROM:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        try:
            return proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()


def shown_step(text: str) -> int:
    import re

    steps = [int(m) for m in re.findall(r"step (\d+)/\d+", text)]
    return max(steps, default=0)


def test_sessions_of_one_two_and_one_process_train_the_uninterrupted_lora(tmp_path):
    code, _ = in_process_session(tmp_path / "ref", tmp_path / "wref")
    assert code == 0, "the uninterrupted reference run failed"

    storage = tmp_path / "s"
    code, _ = in_process_session(storage, tmp_path / "w1", stop_after=FIRST_STOP)
    assert code == 75, "session 1 should end with 'run it again' after the SIGTERM"

    log = tmp_path / "session2.log"
    code = two_process_session(storage, tmp_path / "w2", log)  # a fresh workdir: another VM
    assert code == 75, f"session 2 (two processes) ended {code}:\n{log.read_text(errors='replace')[-3000:]}"

    code, seen = in_process_session(storage, tmp_path / "w3")
    assert code == 0

    ranges = [(s["step_from"], s["step_to"]) for s in sessions(storage / RUN)]
    assert ranges[0] == (0, FIRST_STOP) and ranges[-1][1] == STEPS and len(ranges) == 3, ranges
    assert ranges[1][0] == FIRST_STOP and FIRST_STOP < ranges[1][1] < STEPS, f"session 2 trained no step: {ranges}"
    replans = [e.reason for e in seen if isinstance(e, events.Planned)]
    assert replans and "GPUs 2 → 1" in replans[0] and "effective batch unchanged (2)" in replans[0], replans
    final = "final/pytorch_lora_weights.safetensors"
    assert_same_lora(storage / RUN / final, tmp_path / "ref" / RUN / final)


@pytest.mark.parametrize("world", [2])
def test_an_effective_batch_the_processes_cannot_share_exits_2_naming_the_key(tmp_path, world):
    args = ["train", "--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w"),
            "--plain", "--set", "train.batch_size=1", "--set", "train.grad_accum=3"]  # fmt: skip
    for item in SETTINGS[:4]:
        args += ["--set", item]
    env = relay_env({"RELAY_PROCESSES": str(world), "OMP_NUM_THREADS": "1"})
    done = subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.grad_accum" in done.stderr and "cannot be split evenly over 2 processes" in done.stderr
