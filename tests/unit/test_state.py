"""RunState survives a JSON round trip, refuses formats it cannot read; the run ledger files work on any Storage."""

from __future__ import annotations

import json

import pytest

from runner.errors import CheckpointCorrupt, RelayError, StorageError
from runner.state import (
    STATE_VERSION,
    RunInfo,
    RunState,
    append_session,
    read_run_info,
    read_sessions,
    write_run_info,
)
from runner.storage.local import LocalStorage


def _state(**changes) -> RunState:
    base = dict(
        run="naruto",
        step=400,
        target=2000,
        profile_fingerprint="abc123",
        profile_fields={"lora.rank": 16, "train.lr": 1e-4},
        cache_fingerprint="cafe",
        plan={"micro_batch": 1, "grad_accum": 4, "gradient_checkpointing": True, "world_size": 1},
        trainer={"scheduler": {"last_epoch": 400}, "scaler": {"scale": 65536.0}},
        sessions=[{"platform": "colab", "steps": 400}],
        created="2026-11-22T00:00:00Z",
    )
    base.update(changes)
    return RunState(**base)


def test_round_trip_is_exact():
    state = _state()
    assert RunState.from_json(state.to_json()) == state
    assert json.loads(state.to_json())["version"] == STATE_VERSION


def test_unknown_keys_of_the_same_version_are_ignored():
    data = _state().to_dict() | {"added_later": 1}
    assert RunState.from_dict(data) == _state()


def test_future_version_says_upgrade():
    data = _state().to_dict() | {"version": STATE_VERSION + 1}
    with pytest.raises(RelayError, match="newer Relay") as info:
        RunState.from_dict(data, source="ckpt/step-400")
    assert not isinstance(info.value, CheckpointCorrupt)
    assert "upgrade" in str(info.value)


@pytest.mark.parametrize(
    "text", ["not json", "[]", json.dumps({"version": 1, "run": "x"}), json.dumps({"version": "one"})]
)
def test_malformed_state_is_corrupt_and_named(text):
    with pytest.raises(CheckpointCorrupt) as info:
        RunState.from_json(text, source="store/run/checkpoints/step-00000400")
    assert "step-00000400" in str(info.value)


def test_run_info_round_trip_and_absent(tmp_path):
    storage = LocalStorage(tmp_path)
    assert read_run_info(storage, "naruto") is None
    info = RunInfo(
        run="naruto",
        profile={"train": {"steps": 2000}},
        fingerprint="abc",
        target=2000,
        created="t",
        fingerprint_fields={"lora.rank": 16},
    )
    write_run_info(storage, info)
    assert read_run_info(storage, "naruto") == info


def test_minimal_state_has_defaults():
    state = RunState(run="r", step=0, target=10, profile_fingerprint="fp")
    assert RunState.from_json(state.to_json()) == state
    assert state.plan == {} and state.sessions == [] and state.trainer == {}


def test_run_info_missing_not_ok_names_the_run(tmp_path):
    with pytest.raises(StorageError, match="no run named 'naruto'"):
        read_run_info(LocalStorage(tmp_path), "naruto", missing_ok=False)


def test_run_info_malformed_is_corrupt(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / "naruto").mkdir()
    (tmp_path / "naruto" / "run.json").write_text(json.dumps({"version": 1, "run": "naruto"}))
    with pytest.raises(CheckpointCorrupt, match="run.json"):
        read_run_info(storage, "naruto")


def test_sessions_append_keeps_history_in_order(tmp_path):
    storage = LocalStorage(tmp_path)
    assert read_sessions(storage, "naruto") == []
    for i in range(3):
        append_session(storage, "naruto", {"session": i, "platform": "kaggle"})
    assert [r["session"] for r in read_sessions(storage, "naruto")] == [0, 1, 2]
    assert storage.list("naruto") == ["naruto/sessions.jsonl"]  # one object, replaced whole


def test_sessions_skip_a_torn_line(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / "naruto").mkdir()
    (tmp_path / "naruto" / "sessions.jsonl").write_text('{"session": 0}\n{"sess')  # cut off mid-write
    append_session(storage, "naruto", {"session": 1})
    assert read_sessions(storage, "naruto") == [{"session": 0}, {"session": 1}]
