"""One writer per run: a live lease refuses a second session; a dead one is taken over."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from runner.clock import FakeClock, SystemClock
from runner.errors import LeaseHeld
from runner.lease import Lease, read_lease
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

    from runner.lease import pid_is_running

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
