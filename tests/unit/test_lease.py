"""One writer per run: a live lease refuses a second session; a dead one is taken over."""

from __future__ import annotations

import multiprocessing
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


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    storage, clock = LocalStorage(tmp_path), FakeClock()
    lease = _lease(storage, "colab:a:1", clock)
    lease.acquire()
    for _ in range(4):
        clock.advance(200)
        assert lease.maybe_heartbeat()
    assert not lease.maybe_heartbeat()  # not due yet
    with pytest.raises(LeaseHeld):
        _lease(storage, "kaggle:b:2", clock).acquire()


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
