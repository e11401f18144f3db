"""`relay status` from a storage built by hand: run.json, sessions.jsonl, COMMIT.json files, lease.json.

No training: these files are what sessions leave behind, written here as a user's storage would hold them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from runner.doctor import run_doctor
from runner.env import detect_env
from runner.errors import UsageError
from runner.report import print_status, read_status, settle_sessions
from runner.storage.local import LocalStorage

RUN = "naruto"


def session(step_from: int, step_to: int, reason: str, *, train_s: float, gpu: str = "Tesla T4", **extra) -> dict:
    return {
        "id": f"s{step_from}", "platform": "colab", "tier": "colab-free", "host": "vm", "gpu": gpu, "gpu_count": 1,
        "started": "2026-11-20T10:00:00Z", "wall_s": train_s + 300, "train_s": train_s, "step_from": step_from,
        "step_to": step_to, "steps": step_to - step_from, "reason": reason, **extra,
    }  # fmt: skip


def write(root: Path, key: str, text: str) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_run(
    root: Path, *, target: int = 2000, sessions=(), checkpoints=(), uncommitted=(), final=False, state_sessions=None,
) -> None:  # fmt: skip
    """A run's storage; `state_sessions`: the session records in the newest checkpoint's state.json."""
    info = {"run": RUN, "profile": {"name": "sdxl-naruto-t4"}, "fingerprint": "abc", "target": target,
            "created": "2026-11-20T10:00:00Z", "fingerprint_fields": {}, "version": 1}  # fmt: skip
    write(root, f"{RUN}/run.json", json.dumps(info))
    if sessions:
        write(root, f"{RUN}/sessions.jsonl", "".join(json.dumps(s) + "\n" for s in sessions))
    for step in checkpoints:
        write(root, f"{RUN}/checkpoints/step-{step:08d}/lora.safetensors", "x")
        write(root, f"{RUN}/checkpoints/step-{step:08d}/COMMIT.json", json.dumps({"files": {}, "meta": {}}))
    for step in uncommitted:  # an upload cut off before its COMMIT.json: not a checkpoint
        write(root, f"{RUN}/checkpoints/step-{step:08d}/lora.safetensors", "x")
    if final:
        write(root, f"{RUN}/final/COMMIT.json", "{}")
    if state_sessions is not None:
        state = {"run": RUN, "step": checkpoints[-1], "target": target, "sessions": state_sessions, "version": 1}
        write(root, f"{RUN}/checkpoints/step-{checkpoints[-1]:08d}/state.json", json.dumps(state))


def render(storage_url: str, *args, **kwargs) -> str:
    out = io.StringIO()
    assert print_status(storage_url, *args, console=Console(file=out, width=120), **kwargs) == 0
    return out.getvalue()


@pytest.fixture
def in_progress(tmp_path) -> Path:
    """Two sessions: Colab stopped by its budget at 600, Kaggle by SIGTERM at 900; 950 uploaded but not committed."""
    make_run(
        tmp_path, target=2000,
        sessions=[session(0, 600, "budget", train_s=3 * 3600), session(600, 900, "signal", train_s=1.5 * 3600,
                                                                        gpu="2x Tesla T4", platform="kaggle")],
        checkpoints=[800, 900], uncommitted=[950],
    )  # fmt: skip
    return tmp_path


def test_read_status_of_a_run_in_progress(in_progress):
    status = read_status(LocalStorage(in_progress), None)
    assert (status.run, status.step, status.target, status.last_checkpoint) == (RUN, 900, 2000, 900)
    assert [(s["step_from"], s["step_to"], s["reason"]) for s in status.sessions] == [
        (0, 600, "budget"),
        (600, 900, "signal"),
    ]
    assert status.steps_per_hour == pytest.approx(200.0)  # 900 steps in 4.5 h of training
    assert status.hours_left == pytest.approx(5.5)  # 1100 steps left
    assert status.sessions_left(3.0) == 2 and status.sessions_left(12.0) == 1
    assert not status.complete


def test_status_text_shows_progress_sessions_and_what_is_left(in_progress):
    text = render(str(in_progress), None)
    assert "step 900 / 2000 (45 %)" in text
    assert "last committed checkpoint: step 900" in text
    assert "still needed: 5 h 30 min of training at 200 steps/h, about 2 more sessions of 3 h, or 1 of 12 h" in text
    assert "3 h 05 min" in text  # the first session's time, as a person writes it
    for word in ("colab", "kaggle", "Tesla T4", "2x Tesla T4", "0→600", "600→900", "budget", "signal"):
        assert word in text, word


def test_status_json_parses_and_carries_the_same_numbers(in_progress):
    data = json.loads(render(str(in_progress), RUN, as_json=True))
    assert (data["step"], data["target"], data["last_checkpoint"]) == (900, 2000, 900)
    assert data["hours_left"] == pytest.approx(5.5)
    assert data["sessions_left"] == {"3h": 2, "12h": 1}
    assert len(data["sessions"]) == 2 and data["complete"] is False


def test_a_new_run_without_sessions_or_checkpoints(tmp_path):
    make_run(tmp_path, target=40)
    status = read_status(LocalStorage(tmp_path), RUN)
    assert (status.step, status.last_checkpoint, status.sessions, status.hours_left) == (0, None, [], None)
    text = render(str(tmp_path), None)
    assert "step 0 / 40" in text and "none yet" in text and "no sessions recorded yet" in text
    assert "unknown" in text  # no rate measured yet: no made-up estimate


def test_a_complete_run_needs_nothing_more(tmp_path):
    make_run(tmp_path, target=40, sessions=[session(0, 40, "completed", train_s=60)], checkpoints=[40], final=True)
    status = read_status(LocalStorage(tmp_path), None)
    assert status.complete and status.hours_left == 0 and status.sessions_left(3.0) == 0
    assert "complete" in render(str(tmp_path), None)


def test_a_live_or_dead_holder_is_shown(in_progress):
    lease = {"holder": "kaggle:abc:pid7:s1", "token": "t", "since": "2026-11-20T15:00:00Z", "heartbeat_wall": 1.795e9}
    write(in_progress, f"{RUN}/lease.json", json.dumps(lease))
    status = read_status(LocalStorage(in_progress), None)
    assert status.holder == "kaggle:abc:pid7:s1" and status.heartbeat.startswith("2026-")
    assert "lease held by kaggle:abc:pid7:s1" in render(str(in_progress), None)


def test_stray_names_in_checkpoints_are_ignored(in_progress):
    write(in_progress, f"{RUN}/checkpoints/notes/COMMIT.json", "{}")
    write(in_progress, f"{RUN}/checkpoints/COMMIT.json", "{}")
    assert read_status(LocalStorage(in_progress), None).last_checkpoint == 900


def test_unreadable_session_lines_are_skipped(in_progress):
    log = in_progress / RUN / "sessions.jsonl"
    log.write_text(log.read_text() + "{torn line\n")
    assert len(read_status(LocalStorage(in_progress), None).sessions) == 2


def test_which_run(tmp_path):
    with pytest.raises(UsageError, match="no run found"):
        read_status(LocalStorage(tmp_path), None)
    make_run(tmp_path)
    write(tmp_path, "other/run.json", (tmp_path / RUN / "run.json").read_text())
    with pytest.raises(UsageError, match="several runs") as several:
        read_status(LocalStorage(tmp_path), None)
    assert "naruto" in str(several.value) and "other" in str(several.value)
    assert read_status(LocalStorage(tmp_path), RUN).run == RUN
    with pytest.raises(UsageError, match="no run named 'missing'"):  # bad input: exit 2
        read_status(LocalStorage(tmp_path), "missing")


def test_status_of_a_folder_that_does_not_exist_creates_nothing(tmp_path):
    with pytest.raises(UsageError, match="no such folder") as missing:
        print_status(str(tmp_path / "typo"), None, console=Console(file=io.StringIO()))
    assert missing.value.exit_code == 2
    assert not (tmp_path / "typo").exists()


HEARTBEAT_WALL = 1.795e9


def with_lease(root: Path, holder: str, *, timeout_s: float | None = 300.0) -> None:
    lease = {"holder": holder, "token": "t", "since": "2026-11-20T15:00:00Z", "heartbeat_wall": HEARTBEAT_WALL}
    if timeout_s is not None:
        lease["timeout_s"] = timeout_s
    write(root, f"{RUN}/lease.json", json.dumps(lease))


def live_run(root: Path) -> None:
    """One logged session, and one training now: only in the checkpoints, as "running"."""
    logged = session(0, 600, "budget", train_s=3 * 3600, start_wall=1000.0)
    now = session(600, 750, "running", train_s=3600, start_wall=20000.0, id="live1", platform="kaggle")
    make_run(root, sessions=[logged], checkpoints=[600, 750], state_sessions=[logged, now])


@pytest.mark.parametrize(
    ("holder", "age_s", "pid_runs", "alive"),
    [
        ("kaggle:othervm:pid7:live1", 32.0, False, True),  # another machine, a 32 s old heartbeat: training
        ("kaggle:othervm:pid7:live1", 299.0, False, True),
        ("kaggle:othervm:pid7:live1", 301.0, True, False),  # older than the lease timeout: dead
        ("kaggle:thisvm:pid7:live1", 32.0, True, True),  # this machine, the process runs
        ("kaggle:thisvm:pid7:live1", 32.0, False, False),  # this machine, the process is gone (SIGKILL)
    ],
)
def test_a_session_is_live_while_its_heartbeat_is_younger_than_the_lease_timeout(
    tmp_path, holder, age_s, pid_runs, alive
):
    live_run(tmp_path)
    with_lease(tmp_path, holder)
    status = read_status(LocalStorage(tmp_path), None, now_wall=HEARTBEAT_WALL + age_s, host="thisvm",
                         pid_alive=lambda pid: pid_runs)  # fmt: skip
    assert status.holder_alive is alive
    assert [s["reason"] for s in status.sessions] == ["budget", "running" if alive else "killed"]
    assert status.heartbeat_age_s == pytest.approx(age_s)


def test_the_lease_timeout_comes_from_lease_json(tmp_path):
    live_run(tmp_path)
    with_lease(tmp_path, "kaggle:othervm:pid7:live1", timeout_s=60.0)
    status = read_status(LocalStorage(tmp_path), None, now_wall=HEARTBEAT_WALL + 90, host="thisvm")
    assert not status.holder_alive


def test_settled_sessions_prefer_the_logged_end_over_the_checkpoints_running_copy():
    """A session stopped by a signal after its last checkpoint: the checkpoint says running, the log says signal."""
    in_checkpoint = [session(0, 100, "running", train_s=60, start_wall=1.0)]
    logged = [session(0, 120, "signal", train_s=70, start_wall=1.0)]
    assert settle_sessions(in_checkpoint, logged) == logged
    assert [s["reason"] for s in settle_sessions(in_checkpoint, [])] == ["killed"]
    assert [s["reason"] for s in settle_sessions(in_checkpoint, [], live_id="s0")] == ["running"]


def doctor_text(profile: str, *, gpus: bool, tmp_path: Path) -> tuple[int, str]:
    import dataclasses

    env = detect_env()
    if not gpus:
        env = dataclasses.replace(env, gpus=(), disk_free_gib=100.0, ram_gib=32.0)  # only the GPU varies
    console = Console(file=io.StringIO(), width=200)
    code = run_doctor(str(tmp_path / "s"), profile, console=console, env=env)
    return code, console.file.getvalue()


def test_doctor_says_an_sdxl_profile_cannot_train_without_a_gpu(tmp_path):
    code, text = doctor_text("sdxl-naruto-t4", gpus=False, tmp_path=tmp_path)
    assert "sdxl-naruto-t4 (SDXL) cannot train here; CPU only suits the tiny profile" in text
    assert "verdict: ready" not in text and code == 1


def test_doctor_without_a_gpu_is_ready_for_the_tiny_profile_only(tmp_path):
    code, text = doctor_text("tiny", gpus=False, tmp_path=tmp_path)
    assert "verdict: ready for the tiny profile only" in text and code == 0


def test_a_session_killed_before_it_could_log_itself_is_shown_from_the_checkpoint(tmp_path):
    """A Colab disconnect kills the process: no sessions.jsonl line, but its checkpoints carry its record."""
    logged = session(0, 600, "budget", train_s=3 * 3600, start_wall=1000.0)
    killed = session(600, 750, "error", train_s=3600, start_wall=20000.0, platform="kaggle")  # as stored mid-run
    make_run(tmp_path, sessions=[logged], checkpoints=[600, 750], state_sessions=[logged, killed])
    status = read_status(LocalStorage(tmp_path), None)
    assert [(s["step_from"], s["step_to"], s["reason"]) for s in status.sessions] == [
        (0, 600, "budget"),
        (600, 750, "killed"),
    ]
    assert status.steps_per_hour == pytest.approx(750 / 4)  # its training time counts too
    text = render(str(tmp_path), None)
    assert "600→750" in text and "killed" in text


def test_an_unreadable_state_json_leaves_the_logged_sessions(tmp_path):
    make_run(tmp_path, sessions=[session(0, 600, "budget", train_s=60)], checkpoints=[600], state_sessions=[])
    write(tmp_path, f"{RUN}/checkpoints/step-00000600/state.json", "{torn")
    assert [s["reason"] for s in read_status(LocalStorage(tmp_path), None).sessions] == ["budget"]
