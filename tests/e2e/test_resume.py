"""Exact resume across sessions (issue 4): the tiny profile on CPU, sessions run in-process.

A session is stopped the way a notebook is: SIGTERM after a known optimizer step
(sent from the event bus, so the step is exact). The next session continues it,
and the final LoRA must equal, bit for bit, that of one uninterrupted session.
Also: a changed fingerprint is refused (exit 2, fields named) unless --force;
a damaged newest checkpoint falls back to the previous one; a fresh workdir
downloads the latent cache instead of rebuilding it.

The helpers here (`run_session`, `reference_storage`, …) are shared with
test_accounts.py and test_status.py. Each training test costs ~20–60 s on
2 busy CPU cores, so all but the core stop-and-resume test are marked slow;
the whole file runs in about three minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import events
from runner.clock import FakeClock
from runner.context import Options, build_context
from runner.env import detect_env
from runner.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, ResumeMismatch
from runner.runinfo import ensure_run_info
from runner.wiring import wire

RUN = "tiny"
TARGET = 5
# The tiny profile made cheaper: fewer images, one example per step, a one-step, one-prompt sample grid.
# Every result-changing value is identical in every session of a test and in the reference run.
FAST = (
    f"train.steps={TARGET}",
    "data.generated_count=4",
    "data.validation_count=1",
    "train.batch_size=1",
    "train.grad_accum=1",
    "sample.inference_steps=1",
    'sample.prompts=["a red circle, Naruto style"]',
    # Only the end-of-session checkpoint, so which checkpoints exist does not depend on the machine's speed
    # (test_stop_right_after_a_periodic_checkpoint covers periodic ones). Changes no weights.
    "checkpoint.every_min=30",
)
FINAL_LORA = "final/pytorch_lora_weights.safetensors"


@dataclass
class SessionResult:
    code: int
    events: list[events.Event]

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def warnings(self) -> list[str]:
        return [w.message for w in self.of(events.Warning)]


def run_session(
    storage: str | Path, workdir: Path, *extra: str, stop_after: int | None = None, force: bool = False,
    hours: float | None = None, wrap_storage=None, fake_s_per_step: float | None = None,
) -> SessionResult:  # fmt: skip
    """One session of the FAST tiny run, in this process; SIGTERM right after step `stop_after` if given.

    `fake_s_per_step`: the session runs on a FakeClock that advances this much per step, so `hours` ends it."""
    opts = Options(profile="tiny", storage=str(storage), overrides=FAST + extra, plain=True,
                   workdir=str(workdir), force=force, hours=hours)  # fmt: skip
    clock = FakeClock() if fake_s_per_step is not None else None
    env = detect_env(clock=clock, workdir=str(workdir)) if clock is not None else None
    ctx = build_context(opts, clock=clock, env=env)
    if wrap_storage is not None:
        ctx.storage = wrap_storage(ctx.storage)
    seen: list[events.Event] = []
    session = wire(ctx)

    def on_event(event: events.Event) -> None:
        seen.append(event)
        if stop_after is not None and isinstance(event, events.StepDone) and event.step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # as the platform does; the session finishes this step
        if clock is not None and isinstance(event, events.StepDone):
            clock.advance(fake_s_per_step)
            session.lease.heartbeat()  # the heartbeat thread beats on real time; on the fake clock, the test does

    ctx.bus.subscribe(on_event)
    return SessionResult(session.run(), seen)


def read_lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_lora(actual: Path, expected: Path) -> None:
    import torch

    a, b = read_lora(actual), read_lora(expected)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} LoRA tensors differ, e.g. {differing[:3]}"


def committed_steps(storage: Path, run: str = RUN) -> list[int]:
    return sorted(
        int(p.parent.name.removeprefix("step-")) for p in (storage / run / "checkpoints").glob("*/COMMIT.json")
    )


def sessions_log(storage: Path, run: str = RUN) -> list[dict]:
    lines = (storage / run / "sessions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def reference_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The storage of one uninterrupted session of the FAST run; trained once per pytest session (kept on disk)."""
    storage = tmp_path_factory.getbasetemp() / "relay-reference" / "storage"
    if not (storage / RUN / FINAL_LORA).exists():
        shutil.rmtree(storage.parent, ignore_errors=True)
        result = run_session(storage, storage.parent / "work")
        assert result.code == EXIT_OK, result.warnings()
    return storage


def stopped_storage(tmp_path_factory: pytest.TempPathFactory, dest: Path, step: int = 2) -> Path:
    """A copy of a run stopped by SIGTERM after `step` (built once per pytest session)."""
    source = tmp_path_factory.getbasetemp() / f"relay-stopped-{step}" / "storage"
    if not (source / RUN / "checkpoints" / f"step-{step:08d}" / "COMMIT.json").exists():
        shutil.rmtree(source.parent, ignore_errors=True)
        result = run_session(source, source.parent / "work", stop_after=step)
        assert result.code == EXIT_PREEMPTED, result.warnings()
    shutil.copytree(source, dest)
    return dest


@pytest.fixture
def reference(tmp_path_factory) -> Path:
    return reference_storage(tmp_path_factory)


@pytest.fixture
def stopped(tmp_path_factory, tmp_path) -> Path:
    return stopped_storage(tmp_path_factory, tmp_path / "storage")


# ---------------------------------------------------------------- (a) stop, continue, same LoRA


def test_sigterm_then_resume_gives_the_uninterrupted_lora(reference, tmp_path):
    storage, work = tmp_path / "storage", tmp_path / "work"
    first = run_session(storage, work, stop_after=2)
    assert first.code == EXIT_PREEMPTED
    assert 2 in committed_steps(storage), "the stopped session must leave a committed checkpoint of its last step"
    assert not (storage / RUN / "final").exists()
    assert first.of(events.SessionEnded)[-1].reason == "signal"

    second = run_session(storage, work)
    assert second.code == EXIT_OK
    assert [e.step for e in second.of(events.StepDone)] == [3, 4, 5], "the second session starts after step 2"
    assert_same_lora(storage / RUN / FINAL_LORA, reference / RUN / FINAL_LORA)
    log = sessions_log(storage)
    assert [(s["step_from"], s["step_to"], s["reason"]) for s in log] == [(0, 2, "signal"), (2, 5, "completed")]


@pytest.mark.slow
@pytest.mark.exact_resume
def test_session_budget_spent_then_resume_gives_the_uninterrupted_lora(reference, tmp_path):
    """A half-hour session where each step takes ten minutes (on a FakeClock): the budget stops it mid-run."""
    storage, work = tmp_path / "storage", tmp_path / "work"
    first = run_session(storage, work, hours=0.5, fake_s_per_step=600)
    assert first.code == EXIT_PREEMPTED
    ended = first.of(events.SessionEnded)[-1]
    assert ended.reason == "budget" and 0 < ended.step < TARGET
    assert committed_steps(storage)[-1] == ended.step

    second = run_session(storage, work)
    assert second.code == EXIT_OK
    assert second.of(events.StepDone)[0].step == ended.step + 1
    assert_same_lora(storage / RUN / FINAL_LORA, reference / RUN / FINAL_LORA)


# ---------------------------------------------------------------- (b) settings that change the weights


def test_fingerprint_is_checked_before_training(tmp_path, capsys):
    """Fast: run.json as a first session writes it, then what a second session may and may not change."""
    storage, work = tmp_path / "storage", tmp_path / "work"

    def context(*extra: str, hours: float | None = None):
        return build_context(Options(profile="tiny", storage=str(storage), overrides=FAST + extra,
                                     workdir=str(work), hours=hours))  # fmt: skip

    ensure_run_info(context(), force=False)
    for allowed in (("checkpoint.every_min=5", "checkpoint.keep=9"), ("dashboard.plain_every_s=1",), ()):
        ensure_run_info(context(*allowed, hours=2.5), force=False)
    with pytest.raises(ResumeMismatch) as refused:
        ensure_run_info(context("train.lr=0.5", "data.generated_count=5"), force=False)
    assert set(refused.value.fields) == {"train.lr", "data.generated_count"}

    from runner.cli import main

    args = ["train", "--profile", "tiny", "--storage", str(storage), "--plain", "--workdir", str(work)]
    code = main([*args, *(item for override in FAST for item in ("--set", override)), "--set", "lora.alpha=16"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "lora.alpha" in err and "--force" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.exact_resume
def test_changed_fingerprint_is_refused_naming_the_fields(stopped, tmp_path):
    with pytest.raises(ResumeMismatch) as refused:
        run_session(stopped, tmp_path / "work", "lora.rank=8", "train.lr=0.0005")
    assert set(refused.value.fields) == {"lora.rank", "train.lr"}
    assert refused.value.exit_code == EXIT_USAGE
    assert committed_steps(stopped)[-1] == 2, "a refused resume must not touch the run"


@pytest.mark.slow
@pytest.mark.exact_resume
def test_changed_fingerprint_on_the_command_line_exits_2(stopped, tmp_path, capsys):
    from runner.cli import main

    args = ["train", "--profile", "tiny", "--storage", str(stopped), "--plain", "--workdir", str(tmp_path / "w")]
    args += [item for override in FAST for item in ("--set", override)]
    code = main([*args, "--set", "lora.rank=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "lora.rank" in err and "stored 4, now 8" in err
    assert "--force" in err, "the message must say how to continue anyway"


@pytest.mark.slow
@pytest.mark.exact_resume
def test_force_continues_with_changed_settings_and_says_so(stopped, tmp_path):
    result = run_session(stopped, tmp_path / "work", "train.lr=0.0005", force=True, stop_after=3)
    assert result.code == EXIT_PREEMPTED
    assert any("--force" in w and "train.lr" in w for w in result.warnings()), result.warnings()
    assert [e.step for e in result.of(events.StepDone)] == [3], "it continues from the stored step 2"
    assert 3 in committed_steps(stopped)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_settings_that_do_not_change_the_weights_are_allowed(reference, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(reference, storage)
    result = run_session(
        storage, tmp_path / "work", "checkpoint.every_min=30", "checkpoint.keep=5", "dashboard.plain_every_s=1",
        hours=7.5,
    )  # fmt: skip
    assert result.code == EXIT_OK
    assert any("already complete" in n.message for n in result.of(events.Notice)), result.events
    assert not any("already complete" in w for w in result.warnings()), "a finished run is not a warning"
    assert not result.of(events.StepDone), "a complete run trains no further"


# ---------------------------------------------------------------- (c) a damaged newest checkpoint


@pytest.mark.slow
@pytest.mark.exact_resume
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, stopped, tmp_path):
    work = tmp_path / "work"
    assert run_session(stopped, work, stop_after=3).code == EXIT_PREEMPTED
    assert committed_steps(stopped)[-2:] == [2, 3]
    lora = stopped / RUN / "checkpoints" / "step-00000003" / "lora.safetensors"
    data = bytearray(lora.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size: only the sha256 in COMMIT.json can tell
    lora.write_bytes(bytes(data))

    result = run_session(stopped, work)
    assert result.code == EXIT_OK
    assert any("step 3" in w for w in result.warnings()), result.warnings()
    assert [e.step for e in result.of(events.StepDone)] == [3, 4, 5], "it resumes from step 2"
    assert_same_lora(stopped / RUN / FINAL_LORA, reference / RUN / FINAL_LORA)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(stopped, tmp_path):
    work = tmp_path / "work"
    assert run_session(stopped, work, stop_after=3).code == EXIT_PREEMPTED
    optimizer = stopped / RUN / "checkpoints" / "step-00000003" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])

    result = run_session(stopped, work, stop_after=3)
    assert result.code == EXIT_PREEMPTED
    assert any("step 3" in w for w in result.warnings()), result.warnings()
    assert [e.step for e in result.of(events.StepDone)] == [3]


# ---------------------------------------------------------------- (d) a fresh VM


@pytest.mark.slow
@pytest.mark.exact_resume
def test_fresh_workdir_downloads_the_cache_and_resumes_exactly(reference, stopped, tmp_path, monkeypatch):
    import runner.train.cache

    def no_build(*args, **kwargs):
        raise AssertionError("the latent cache was rebuilt (VAE and text encoders loaded) instead of downloaded")

    monkeypatch.setattr(runner.train.cache, "build_cache", no_build)
    fresh = tmp_path / "fresh-vm"
    result = run_session(stopped, fresh)
    assert result.code == EXIT_OK
    assert not result.of(events.CacheProgress)
    assert any((fresh / RUN / "cache").glob("*/COMMIT.json")), "the cache is downloaded into the new workdir"
    assert_same_lora(stopped / RUN / FINAL_LORA, reference / RUN / FINAL_LORA)


# ---------------------------------------------------------------- a stop right after a periodic checkpoint


class SlowUploads:
    """A storage whose checkpoint puts take a while, as Drive's do; `uploading` is set once one has begun."""

    def __init__(self, inner, delay_s: float = 1.0) -> None:
        self.inner, self.delay_s, self.url = inner, delay_s, inner.url
        self.uploading = threading.Event()

    def put(self, local_file, key: str) -> None:
        if "/checkpoints/" in key:
            self.uploading.set()
            time.sleep(self.delay_s)
        self.inner.put(local_file, key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_stop_right_after_a_periodic_checkpoint_exits_75(tmp_path, monkeypatch):
    import runner.budget

    slow: list[SlowUploads] = []
    context = runner.budget.context
    calls_after_step_2: list[int] = []

    def wrap(storage) -> SlowUploads:
        slow.append(SlowUploads(storage))
        return slow[-1]

    def context_once_uploading(*args, **kwargs):
        if kwargs["steps_left"] == TARGET - 2:
            calls_after_step_2.append(1)
            if len(calls_after_step_2) == 2:  # the checkpoint of step 2 is submitted: let the worker pick it up
                assert slow[0].uploading.wait(30)
        return context(*args, **kwargs)

    # a periodic checkpoint after step 2 only, the step the SIGTERM comes after
    monkeypatch.setattr(runner.budget, "should_checkpoint", lambda ctx: ctx.steps_left == TARGET - 2)
    monkeypatch.setattr(runner.budget, "context", context_once_uploading)
    result = run_session(tmp_path / "storage", tmp_path / "work", stop_after=2, wrap_storage=wrap)
    assert result.code == EXIT_PREEMPTED
    assert committed_steps(tmp_path / "storage")[-1] == 2
