"""Checkpoints: staged fast, uploaded in the background, committed last, rotated safely, restored verified."""

from __future__ import annotations

import threading

import pytest

from runner import events
from runner.checkpoint import COMMIT, CheckpointManager, step_dir_name
from runner.clock import FakeClock
from runner.state import RunState
from runner.storage.local import LocalStorage
from tests.flaky import FlakyStorage

RUN = "naruto"


def _writer(step: int):
    """A stand-in for the trainer's save_state: two tensor files whose bytes depend on the step."""

    def write(folder):
        (folder / "lora.safetensors").write_bytes(bytes([step % 256]) * 2048)
        (folder / "optimizer.safetensors").write_bytes(bytes([(step * 7) % 256]) * 4096)
        return {"scheduler": {"last_epoch": step}}

    return write


def _state() -> RunState:
    return RunState(
        run=RUN,
        step=0,
        target=100,
        profile_fingerprint="fp",
        profile_fields={"lora.rank": 4},
        cache_fingerprint="cache",
        plan={"micro_batch": 1, "grad_accum": 1, "gradient_checkpointing": False, "world_size": 1},
        trainer={},
    )


class Harness:
    def __init__(self, tmp_path, *, keep=3, storage=None, **kw):
        self.local = LocalStorage(tmp_path / "store")
        self.storage = storage(self.local) if storage else self.local
        self.events: list[events.Event] = []
        bus = events.EventBus()
        bus.subscribe(self.events.append)
        self.clock = FakeClock()
        self.workdir = tmp_path / "work"
        self.manager = CheckpointManager(self.storage, RUN, self.workdir, keep=keep, bus=bus, clock=self.clock, **kw)

    def save(self, step: int, *, wait: bool = True, ok: bool = True):
        """Stage and submit `step`; with wait, require that wait() reports it committed (ok) or not."""
        staged = self.manager.stage(step, _writer(step), _state())
        self.manager.submit(staged)
        if wait:
            assert self.manager.wait(timeout_s=30) is ok
        return staged

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def ckpt_file(self, step: int, name: str):
        return self.local.root / RUN / "checkpoints" / step_dir_name(step) / name


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.manager.close(timeout_s=30)


def test_round_trip_restores_the_same_files_and_state(h, tmp_path):
    staged = h.save(10)
    sent = {p.name: p.read_bytes() for p in _fresh_copy(tmp_path, 10).iterdir()}
    restored = h.manager.latest(tmp_path / "restore")
    assert restored.step == 10
    assert {p.name: p.read_bytes() for p in restored.dir.iterdir()} == sent
    assert restored.state.step == 10 and restored.state.trainer == {"scheduler": {"last_epoch": 10}}
    assert restored.meta["scheduler"] == {"last_epoch": 10} and restored.meta["step"] == 10
    assert [e.step for e in h.of(events.CheckpointCommitted)] == [10]
    assert h.of(events.CheckpointStaged)[0].bytes == staged.bytes
    assert h.of(events.UploadProgress)[-1].done_bytes == staged.bytes
    assert not staged.dir.exists()  # committed: the staging copy is gone


def test_state_returned_by_the_writer_as_json_is_restored(h, tmp_path):
    state = _state()

    def write(folder):
        (folder / "lora.safetensors").write_bytes(b"w")
        return {"state": state.to_json()}  # how a writer may carry its own RunState

    h.manager.submit(h.manager.stage(5, write))
    assert h.manager.wait(timeout_s=30)
    restored = h.manager.latest(tmp_path / "restore")
    assert restored.state == state and restored.meta["step"] == 5


class _Snapshot:
    """A stand-in for the trainer's StateSnapshot: `_writer(step)`'s files, written when the worker asks."""

    nbytes = 6144

    def __init__(self, step: int, fail: OSError | None = None, gate: threading.Event | None = None):
        self.step, self.fail, self.gate = step, fail, gate
        self.thread: str | None = None

    def write(self, folder):
        self.thread = threading.current_thread().name
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail is not None:
            (folder / "lora.safetensors").write_bytes(b"half")
            raise self.fail
        return _writer(self.step)(folder)


def test_a_snapshot_is_written_by_the_worker_and_commits_the_same_files_as_stage(h, tmp_path):
    gate = threading.Event()
    snapshot = _Snapshot(10, gate=gate)
    staged = h.manager.stage_snapshot(10, lambda: snapshot, _state())
    assert not staged.dir.exists(), "staging a snapshot must not write it in the caller's thread"
    assert h.of(events.CheckpointStaged)[0].bytes == _Snapshot.nbytes
    h.manager.submit(staged)
    gate.set()
    assert h.manager.wait(timeout_s=30)
    assert snapshot.thread == "relay-upload"
    committed = h.local.root / RUN / "checkpoints" / step_dir_name(10)
    want = {p.name: p.read_bytes() for p in _fresh_copy(tmp_path, 10).iterdir()}
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == want
    restored = h.manager.latest(tmp_path / "restore")
    assert restored.step == 10 and restored.state.trainer == {"scheduler": {"last_epoch": 10}}
    assert h.of(events.CheckpointCommitted)[0].bytes == sum(len(b) for b in want.values())


def test_a_snapshot_that_cannot_be_written_is_raised_to_the_caller_and_nothing_reaches_storage(h, tmp_path):
    import errno

    from runner.errors import StorageError

    h.save(4)
    snapshot = _Snapshot(5, fail=OSError(errno.ENOSPC, "No space left on device"))
    h.manager.submit(h.manager.stage_snapshot(5, lambda: snapshot, _state()))
    with pytest.raises(StorageError, match="could not stage checkpoint step 5.*No space left on device") as info:
        for _ in range(300):  # the session calls check() after every step
            h.manager.check()
            threading.Event().wait(0.01)
    assert "free local disk space" in (info.value.hint or "")
    assert not (h.workdir / "staging" / step_dir_name(5)).exists(), "the half-written folder is left behind"
    assert h.manager.committed_steps() == [4]
    h.manager.submit(h.manager.stage_snapshot(6, lambda: _Snapshot(6), _state()))  # the disk has room again
    assert h.manager.wait(timeout_s=30)
    assert h.manager.committed_steps() == [4, 6]


def _fresh_copy(tmp_path, step):
    """What the trainer wrote for `step`, staged again in a scratch manager (same bytes, same state)."""
    scratch = CheckpointManager(LocalStorage(tmp_path / "unused"), RUN, tmp_path / "scratch", keep=1, clock=FakeClock())
    return scratch.stage(step, _writer(step), _state()).dir


def test_no_checkpoint_means_none(h, tmp_path):
    assert h.manager.latest(tmp_path / "restore") is None
    assert h.manager.committed_steps() == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated upload
        lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),  # one bit flipped
        lambda p: p.unlink(),  # COMMIT.json present, file gone
    ],
    ids=["truncated", "bit-flip", "missing-file"],
)
def test_latest_falls_back_past_a_damaged_newest(h, tmp_path, damage):
    h.save(10)
    h.save(20)
    damage(h.ckpt_file(20, "lora.safetensors"))
    restored = h.manager.latest(tmp_path / "restore")
    assert restored.step == 10
    assert (restored.dir / "lora.safetensors").read_bytes() == bytes([10]) * 2048
    warnings = [w.message for w in h.of(events.Warning)]
    assert any("step 20" in m and "lora.safetensors" in m for m in warnings), warnings
    assert not (tmp_path / "restore" / step_dir_name(20)).exists()


def test_folder_without_commit_is_never_chosen(h, tmp_path):
    h.save(10)
    h.save(20)
    h.ckpt_file(20, COMMIT).unlink()  # as if the session died before the last put
    assert h.manager.committed_steps() == [10]
    assert h.manager.latest(tmp_path / "restore").step == 10
    assert h.manager.latest(tmp_path / "restore").step == 10
    unfinished = [w for w in h.of(events.Warning) if "no COMMIT.json" in w.message]
    assert len(unfinished) == 1 and "20" in unfinished[0].message  # warned once


def test_rotation_keeps_the_newest_k(h):
    for step in (10, 20, 30, 40, 50):
        h.save(step)
    assert h.manager.committed_steps() == [30, 40, 50]
    assert h.local.list(f"{RUN}/checkpoints/{step_dir_name(10)}") == []


def test_rotation_deletes_commit_json_first(tmp_path):
    h = Harness(tmp_path, keep=1, storage=FlakyStorage)
    h.save(10)
    h.save(20)
    h.manager.close()
    deletes = [key for op, key in h.storage.calls if op == "delete"]
    assert deletes[0].endswith(f"{step_dir_name(10)}/{COMMIT}")
    assert sorted(d.rsplit("/", 1)[1] for d in deletes[1:]) == [
        "lora.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


def test_rotation_removes_orphans_below_and_leaves_newer_folders(tmp_path):
    first = Harness(tmp_path, keep=2)
    for step in (10, 20, 40):
        first.save(step)
    first.manager.close()
    h = Harness(tmp_path, keep=1)  # the next session
    h.ckpt_file(40, "lora.safetensors").write_bytes(b"broken")  # newest is corrupt: resume from 20
    h.local.put(h.ckpt_file(20, "lora.safetensors"), f"{RUN}/checkpoints/{step_dir_name(25)}/lora.safetensors")
    assert h.manager.latest(tmp_path / "restore").step == 20
    h.save(30)
    h.manager.close()
    assert h.manager.committed_steps() == [30, 40]  # 20 rotated out; 40 is left for a later commit to replace
    assert h.local.list(f"{RUN}/checkpoints/{step_dir_name(25)}") == []  # orphaned partial upload removed
    h2 = Harness(tmp_path, keep=1)
    h2.save(40)
    h2.manager.close()
    assert h2.manager.latest(tmp_path / "restore2").step == 40


def test_upload_does_not_block_stage_and_newer_replaces_waiting(tmp_path):
    gate = threading.Event()
    h = Harness(tmp_path, storage=lambda inner: FlakyStorage(inner, gate=gate))
    h.save(10, wait=False)
    assert h.storage.at_gate.wait(timeout=30)  # step 10 is uploading, held at its first put
    h.save(20, wait=False)
    h.save(30, wait=False)  # replaces 20, which never started
    assert not h.manager.wait(timeout_s=0.05)
    assert h.of(events.CheckpointCommitted) == [] and len(h.of(events.CheckpointStaged)) == 3
    gate.set()
    assert h.manager.wait(timeout_s=30)
    assert [e.step for e in h.of(events.CheckpointCommitted)] == [10, 30]
    assert h.manager.committed_steps() == [10, 30]
    assert not (h.workdir / "staging" / step_dir_name(20)).exists()
    h.manager.close()


def test_transient_errors_are_retried_without_real_sleep(tmp_path):
    h = Harness(tmp_path, storage=lambda inner: FlakyStorage(inner, fail_ops={"put": 2}, transient=True))
    h.save(10)
    h.manager.close()
    assert [e.step for e in h.of(events.CheckpointCommitted)] == [10]
    assert len(h.clock.sleeps) == 2 and all(0 <= s <= 60 for s in h.clock.sleeps)
    assert len([w for w in h.of(events.Warning) if w.kind == "retry"]) == 2
    assert h.manager.latest(tmp_path / "restore").step == 10


def test_permanent_failure_keeps_local_copy_and_next_submit_succeeds(tmp_path):
    flaky = {}

    def wrap(inner):
        flaky["s"] = FlakyStorage(inner, transient=False, key_contains="optimizer")
        return flaky["s"]

    h = Harness(tmp_path, storage=wrap)
    h.save(10)
    h.save(20)  # the committed one survives a later failure
    flaky["s"].fail_ops["put"] = 1
    failed = h.save(30, ok=False)
    [event] = h.of(events.UploadFailed)
    assert event.step == 30 and "injected" in event.error and event.local_copy == str(failed.dir)
    assert (failed.dir / "lora.safetensors").is_file() and (failed.dir / COMMIT).is_file()
    assert h.manager.committed_steps() == [10, 20] and h.manager.last_error
    assert h.manager.latest(tmp_path / "restore").step == 20
    h.save(40)
    h.manager.close()
    assert h.manager.committed_steps() == [10, 20, 40] and h.manager.last_error is None
    assert h.manager.last_committed == 40
    assert not failed.dir.exists()  # superseded by the newer commit


def test_exhausted_transient_retries_become_upload_failed(tmp_path):
    h = Harness(
        tmp_path, storage=lambda inner: FlakyStorage(inner, fail_ops={"put": 99}, transient=True), upload_attempts=3
    )
    h.save(10, ok=False)
    h.manager.close()
    assert [e.step for e in h.of(events.UploadFailed)] == [10]
    assert len(h.clock.sleeps) == 2
    assert h.manager.committed_steps() == []


def test_only_verified_checkpoint_survives_keep_one(tmp_path):
    h = Harness(tmp_path, keep=1, storage=lambda inner: FlakyStorage(inner, fail_ops={}, transient=False))
    h.save(10)
    h.storage.fail_ops["put"] = 1
    h.save(20, ok=False)
    h.manager.close()
    assert h.manager.committed_steps() == [10]
    assert h.manager.latest(tmp_path / "restore").step == 10


def test_recommitting_a_step_retracts_its_old_marker_first(tmp_path):
    first = Harness(tmp_path)
    first.save(10)
    first.save(20)
    first.manager.close()
    first.ckpt_file(20, "lora.safetensors").write_bytes(b"broken")
    h = Harness(tmp_path, storage=FlakyStorage)
    assert h.manager.latest(tmp_path / "restore").step == 10
    h.save(20)  # trained again from 10 to 20
    h.manager.close()
    writes = [(op, key.rsplit("/", 1)[1]) for op, key in h.storage.calls if op in ("put", "delete") and "00020" in key]
    assert writes[0] == ("delete", COMMIT) and writes[-1] == ("put", COMMIT)
    assert h.manager.latest(tmp_path / "restore").step == 20
