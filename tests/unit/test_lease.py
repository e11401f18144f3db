"""One writer per run: a live lease refuses a second session; a dead one is taken over."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from runner.clock import FakeClock, SystemClock
from runner.errors import EXIT_REFUSED, LeaseHeld, LeaseLapsed, LeaseLost, StorageError
from runner.lease import Lease
from runner.leaserecord import read_lease
from runner.storage.local import LocalStorage


def _lease(storage, holder, clock, **kw) -> Lease:
    return Lease(storage, "run", holder, clock=clock, timeout_s=300.0, settle_s=2.0, **kw)


def test_acquire_writes_and_settles(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    record = _lease(storage, "colab:a:1", clock).acquire()
    assert record.holder == "colab:a:1"
    assert clock.sleeps == [2.0]
    assert read_lease(storage, "run").token == record.token


def test_fresh_lease_refuses_another_holder(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    _lease(storage, "colab:a:1", clock).acquire()
    clock.advance(120)
    with pytest.raises(LeaseHeld) as info:
        _lease(storage, "kaggle:b:2", clock).acquire()
    assert info.value.holder == "colab:a:1"
    assert info.value.heartbeat_age_s == pytest.approx(122.0)  # written before the 2 s settle
    assert "--take-over" in str(info.value)
    assert read_lease(storage, "run").holder == "colab:a:1"


def test_stale_lease_is_taken_over(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    _lease(storage, "colab:a:1", clock).acquire()
    clock.advance(301)
    assert _lease(storage, "kaggle:b:2", clock).acquire().holder == "kaggle:b:2"


def test_take_over_of_fresh_lease_and_old_holder_stops_at_heartbeat(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    old = _lease(storage, "colab:a:1", clock)
    old.acquire()
    new = _lease(storage, "kaggle:b:2", clock)
    new.acquire(take_over=True)
    with pytest.raises(LeaseHeld) as info:
        old.heartbeat()
    assert info.value.holder == "kaggle:b:2"
    old.release()  # not ours any more: must not delete the new holder's lease
    assert read_lease(storage, "run").holder == "kaggle:b:2"


class Beats:
    """The heartbeat thread's wait(): each call advances the fake clock by the interval asked for and lets
    one beat through, `count` times; then it reports "stopped" and sets `done`."""

    def __init__(self, clock: FakeClock, count: int) -> None:
        self.clock, self.left, self.done, self.waits = clock, count, threading.Event(), []

    def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if self.left == 0:
            self.done.set()
            return True
        self.left -= 1
        self.clock.advance(seconds)
        return False


def test_the_heartbeat_thread_keeps_the_lease_fresh_whatever_the_session_does(tmp_path):
    """From acquire to release the lease is renewed by its own thread: a 20-minute setup (downloads, the
    latent cache, compiling) with no training step never lets another session take the run."""
    storage, clock = LocalStorage(tmp_path), FakeClock()
    lease = _lease(storage, "colab:a:1", clock)
    lease.acquire()
    beats = Beats(clock, 12)  # 12 beats of 100 s: 20 minutes with nothing but the thread renewing it
    heartbeat = lease.start_heartbeat(wait=beats)
    assert beats.done.wait(10)
    assert heartbeat.beats == 12 and set(beats.waits) == {100.0}  # timeout / 3
    with pytest.raises(LeaseHeld):
        _lease(storage, "kaggle:b:2", clock).acquire()
    lease.release()
    assert read_lease(storage, "run") is None


def test_a_heartbeat_that_finds_the_lease_taken_makes_the_session_stop(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    old = _lease(storage, "colab:a:1", clock)
    old.acquire()
    _lease(storage, "kaggle:b:2", clock).acquire(take_over=True)
    beats = Beats(clock, 3)
    heartbeat = old.start_heartbeat(wait=beats)
    heartbeat._thread.join(10)
    assert heartbeat.beats == 0 and heartbeat.lost is not None and heartbeat.lost.holder == "kaggle:b:2"
    assert isinstance(heartbeat.lost, LeaseLost) and heartbeat.lost.exit_code == EXIT_REFUSED
    with pytest.raises(LeaseHeld):
        old.check()
    old.release()
    assert read_lease(storage, "run").holder == "kaggle:b:2"


def test_release_frees_the_run(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    lease = _lease(storage, "colab:a:1", clock)
    lease.acquire()
    lease.release()
    assert read_lease(storage, "run") is None
    assert _lease(storage, "kaggle:b:2", clock).acquire().holder == "kaggle:b:2"


def test_unreadable_lease_counts_as_free(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text("{torn")
    assert _lease(storage, "colab:a:1", clock).acquire().holder == "colab:a:1"


def _contend(root: str, holder: str, start_at: float, results) -> None:
    lease = Lease(LocalStorage(root), "run", holder, clock=SystemClock(), timeout_s=300.0, settle_s=0.5)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
        results.put((holder, "won"))
    except LeaseHeld as exc:
        results.put((holder, f"lost to {exc.holder}"))


def test_two_processes_racing_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), f"p{i}", start_at, results)) for i in range(2)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    winners = [h for h, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    loser = next(h for h in outcomes if h != winners[0])
    assert outcomes[loser] == f"lost to {winners[0]}"
    assert read_lease(LocalStorage(tmp_path), "run").holder == winners[0]


def test_a_killed_process_not_yet_reaped_counts_as_gone():
    """A SIGKILLed session whose parent has not reaped it yet is a zombie: kill(pid, 0) still answers, but its
    lease must be taken over at once (the two-process kill test was refused on that)."""
    import signal
    import subprocess
    import time

    from runner.leaserecord import pid_is_running

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_is_running(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_is_running(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_is_running(child.pid), "a zombie was taken for a running process"
        assert child.poll() is not None  # it was still unreaped while we checked: reaped only now
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------- one writer on a folder: the fence


def _fenced_manager(storage, lease, tmp_path, name, clock):
    from runner.checkpoint.manager import CheckpointManager
    from runner.storage.fenced import FencedStorage

    return CheckpointManager(FencedStorage(storage, lease.assert_held), "run", tmp_path / name, keep=1, clock=clock,
                             upload_attempts=1)  # fmt: skip


def _commit_step(manager, step: int) -> bool:
    manager.submit(manager.stage(step, lambda d: (d / "lora.safetensors").write_bytes(bytes([step]) * 64) and {}))
    return manager.wait()


def _committed(root) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (root / "run" / "checkpoints").glob("step-*/COMMIT.json"))


def test_after_a_takeover_the_old_holder_commits_and_deletes_nothing_on_a_folder(tmp_path):
    """A's heartbeat stopped landing for longer than the timeout; B takes the run and commits step 20.
    A still thinks it holds the run (its own clock says the lease is fresh); its next checkpoint (keep=1:
    it would delete B's step 20) is refused by the token check right before the write."""
    root = tmp_path / "store"
    storage, clock_a, clock_b = LocalStorage(root), FakeClock(), FakeClock(start_wall=1_800_000_000.0 + 301)
    old = _lease(storage, "colab:a:1", clock_a)
    old.acquire()
    old_ckpts = _fenced_manager(storage, old, tmp_path, "a", clock_a)
    assert _commit_step(old_ckpts, 10)
    new = _lease(storage, "kaggle:b:2", clock_b)
    new.acquire()  # A's heartbeat is 301 s old on B's clock: taken without --take-over
    assert _commit_step(_fenced_manager(storage, new, tmp_path, "b", clock_b), 20)
    assert _committed(root) == [20]
    with pytest.raises(LeaseLost) as info:
        _commit_step(old_ckpts, 30)
    assert info.value.exit_code == EXIT_REFUSED and "kaggle:b:2" in str(info.value)
    assert _committed(root) == [20] and not (root / "run" / "checkpoints" / "step-00000030").exists()
    with pytest.raises(LeaseLost):
        old.check()
    old.release()
    assert read_lease(storage, "run").holder == "kaggle:b:2"


def test_a_holder_whose_lease_may_have_lapsed_writes_nothing(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    lease = _lease(storage, "colab:a:1", clock)
    lease.acquire()
    clock.advance(lease.timeout_s - lease.guard_s)  # no renewal landed since: others may soon call it dead
    with pytest.raises(LeaseLapsed):
        lease.assert_held()
    assert lease.is_lost


class FailingPuts(LocalStorage):
    """A folder whose writes time out (a hung mount), after `ok` good ones."""

    def __init__(self, root, ok: int) -> None:
        super().__init__(root)
        self.ok = ok

    def put(self, local_file, key):
        if self.ok <= 0:
            raise StorageError(f"writing {key} timed out", key=key, transient=True)
        self.ok -= 1
        super().put(local_file, key)


def test_a_heartbeat_that_cannot_land_ends_the_session_before_the_lease_lapses(tmp_path):
    storage, clock = FailingPuts(tmp_path, ok=1), FakeClock()
    lease = _lease(storage, "colab:a:1", clock)
    lease.acquire()
    beats = Beats(clock, 100)
    heartbeat = lease.start_heartbeat(wait=beats)
    heartbeat._thread.join(10)
    assert isinstance(heartbeat.lost, LeaseLapsed)
    assert clock.monotonic() < lease.timeout_s  # stopped while its lease.json still read as fresh
    assert beats.waits[0] == 100.0 and beats.waits[-1] < 100.0  # tried more often as the lapse neared
    with pytest.raises(LeaseLapsed):
        lease.check()


def test_one_judgement_of_a_holders_life_with_the_holders_own_timeout(tmp_path):
    from runner.leaserecord import LeaseRecord, read_lease

    clock = FakeClock()
    storage = LocalStorage(tmp_path)
    lease = Lease(storage, "run", "colab:vmA:pid42:s1", clock=clock, timeout_s=60.0, settle_s=0.0)
    lease.acquire()
    record = read_lease(storage, "run")
    assert record.timeout_s == 60.0 and record.session_id == "s1"  # lease.json carries the holder's timeout
    now = clock.wall()
    running = {42}
    assert record.is_live(now + 59, "vmB", running.__contains__)  # another machine: the heartbeat alone tells
    assert not record.is_live(now + 61, "vmB", running.__contains__)  # older than *its* timeout, not 300 s
    assert not record.is_live(now + 1, "vmA", set().__contains__)  # this machine, and pid 42 is gone
    assert LeaseRecord("h", "t", "", 0.0).timeout_s == 300.0  # an older lease.json without the field
