"""`relay status` as a user runs it: a separate process, no model, no GPU, JSON that parses.

The fast tests read a storage written by hand (tests/unit/test_report.py builds it); the slow one reads a
real tiny run stopped by SIGTERM after step 2 (tests/e2e/test_resume.py trains it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.e2e.test_resume import FAST, TARGET, stopped_storage
from tests.e2e.test_resume import RUN as TINY_RUN
from tests.unit.test_report import RUN, make_run, session

HEAVY = ("torch", "diffusers", "peft", "transformers", "accelerate")
# Runs the real CLI, then reports which heavy modules the process imported.
PROBE = (
    "import json, sys\n"
    "from runner.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print(json.dumps({{'code': code, 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
)


def relay(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def in_progress(tmp_path):
    make_run(tmp_path, target=2000, sessions=[session(0, 600, "budget", train_s=3 * 3600)], checkpoints=[600])
    return tmp_path


def test_status_imports_no_model_library(in_progress):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "status", "--storage", str(in_progress)], capture_output=True, text=True,
        timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}
    assert "step 600 / 2000" in out.stdout


def test_status_json_from_the_command_line(in_progress):
    out = relay("status", "--storage", str(in_progress), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["run"], data["step"], data["target"], data["last_checkpoint"]) == (RUN, 600, 2000, 600)
    assert data["sessions"][0]["reason"] == "budget" and data["sessions_left"] == {
        "3h": 3,
        "12h": 1,
    }  # 1400 steps at 200/h: 7 h


def test_status_of_a_run_name_that_does_not_exist(in_progress):
    out = relay("status", "--storage", str(in_progress), "--run", "nope")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no run named 'nope'" in out.stderr


@pytest.mark.slow
def test_status_of_a_real_stopped_run(tmp_path_factory, tmp_path):
    storage = stopped_storage(tmp_path_factory, tmp_path / "storage", step=2)
    out = relay("status", "--storage", str(storage))
    assert out.returncode == 0, out.stderr
    assert f"step 2 / {TARGET}" in out.stdout and "last committed checkpoint: step 2" in out.stdout
    assert "still needed:" in out.stdout
    for word in ("local", "CPU", "0→2", "signal"):
        assert word in out.stdout, word
    data = json.loads(relay("status", "--storage", str(storage), "--json").stdout)
    assert data["step"] == 2 and not data["complete"] and data["holder"] is None  # the lease was released


@pytest.mark.slow
def test_status_of_a_session_killed_outright(tmp_path):
    """SIGKILL (a Colab disconnect): no sessions.jsonl line, a stale lease; status still tells the story."""
    storage = tmp_path / "storage"
    sets = [*FAST, "train.steps=500", "checkpoint.every_min=0.001"]  # a long run that checkpoints often
    cmd = [sys.executable, "-m", "runner", "train", "--profile", "tiny", "--storage", str(storage), "--plain",
           "--workdir", str(tmp_path / "work"), *(item for s in sets for item in ("--set", s))]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(storage.glob(f"{TINY_RUN}/checkpoints/*/COMMIT.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint committed in 5 minutes"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert not (storage / TINY_RUN / "sessions.jsonl").exists()

    data = json.loads(relay("status", "--storage", str(storage), "--json").stdout)
    assert data["step"] > 0 and data["target"] == 500
    assert [(s["step_from"], s["reason"]) for s in data["sessions"]] == [(0, "killed")]
    assert data["holder"] and data["holder"].startswith("local:")
    text = relay("status", "--storage", str(storage)).stdout
    assert "killed" in text and "lease held by local:" in text
