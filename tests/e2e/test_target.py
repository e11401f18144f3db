"""A run's target is the run's (issue 14, items 6 and 7): a rerun with the profile's smaller default never
completes short of the stored target; a change of target is on purpose and announced; a session too short
to train says why and promises nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from runner import events
from runner.context import Options, build_context
from runner.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from runner.wiring import wire
from tests.e2e.test_resume import FAST

ROOT = Path(__file__).resolve().parents[2]
# test_resume's cheap, result-neutral settings, without its target (these tests set their own)
CHEAP = tuple(item for item in FAST if not item.startswith("train.steps="))


def profile_with_steps(tmp_path: Path, steps: int) -> str:
    """tiny.toml with a smaller default target, as a user's profile with the profile's own steps."""
    text = (ROOT / "profiles" / "tiny.toml").read_text().replace("steps = 40", f"steps = {steps}")
    path = tmp_path / "tiny-short.toml"
    path.write_text(text)
    return str(path)


def session(profile: str, tmp_path: Path, *extra: str, stop_after: int | None = None):
    opts = Options(profile=profile, storage=str(tmp_path / "storage"), run="job", overrides=CHEAP + extra,
                   plain=True, workdir=str(tmp_path / "work"))  # fmt: skip
    ctx = build_context(opts)
    seen: list[events.Event] = []

    def on_event(event: events.Event) -> None:
        seen.append(event)
        if stop_after is not None and isinstance(event, events.StepDone) and event.step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the session finishes this step, commits it and exits 75

    ctx.bus.subscribe(on_event)
    return wire(ctx).run(), seen


def test_a_rerun_with_the_profiles_smaller_target_trains_to_the_stored_one(tmp_path):
    profile = profile_with_steps(tmp_path, 2)
    code, _ = session(profile, tmp_path, "train.steps=4", stop_after=1)
    assert code == EXIT_PREEMPTED

    code, seen = session(profile, tmp_path)  # the profile says 2; the run was started for 4
    assert code == EXIT_OK
    assert [e.step for e in seen if isinstance(e, events.StepDone)] == [2, 3, 4]
    ended = [e for e in seen if isinstance(e, events.SessionEnded)][-1]
    assert (ended.step, ended.target, ended.reason) == (4, 4, "completed")
    assert not [e for e in seen if isinstance(e, events.Warning) and e.kind == "target"]
    final = json.loads((tmp_path / "storage" / "job" / "final" / "COMMIT.json").read_text())
    assert final["meta"]["step"] == 4

    code, seen = session(profile, tmp_path, "train.steps=5")  # a new target, asked for on purpose
    assert code == EXIT_OK
    assert [e.message for e in seen if isinstance(e, events.Warning) and e.kind == "target"] == [
        "target changed from 4 to 5 steps"
    ]
    assert [e.step for e in seen if isinstance(e, events.StepDone)] == [5]
    assert json.loads((tmp_path / "storage" / "job" / "run.json").read_text())["target"] == 5


def test_a_session_too_short_to_train_says_why_and_is_bad_input(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "runner", "train", "--profile", "tiny", "--plain", "--hours", "0.05",
         "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == EXIT_USAGE, out.stderr
    assert "nothing can be trained" in out.stderr and "safety margin" in out.stderr and "--hours" in out.stderr
    assert not (tmp_path / "s" / "tiny" / "checkpoints").exists()
