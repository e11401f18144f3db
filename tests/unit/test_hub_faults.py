"""The Hub backend under faults, against the stand-in Hub: rate limits, 5xx bursts, an answer lost after
the commit landed, a commit racing a lease, a download cut short."""

from __future__ import annotations

import json

import pytest

from runner.clock import FakeClock
from runner.errors import LeaseHeld, StorageError
from runner.lease import Lease, read_lease
from runner.storage.hub import open_hub
from runner.storage.retry import RetryPolicy, was_retried
from tests.hubserver import HubServer

POLICY = RetryPolicy(attempts=5, initial_s=1.0, max_s=8.0, jitter_s=0.5)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock()


def open_as(hub: HubServer, user: str, clock: FakeClock):
    env = {"HF_TOKEN": hub.state.add_token(user), "HF_ENDPOINT": hub.endpoint}
    return open_hub("hf://team/runs", env=env, clock=clock, retry=POLICY)


@pytest.fixture
def storage(hub, clock):
    hub.state.orgs["team"] = {"alice", "bob"}
    return open_as(hub, "alice", clock)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(b"checkpoint bytes" * 1000)
    return path


def commits(hub: HubServer) -> list[str]:
    return [c.title for c in hub.state.commits("team/runs")]


def test_429_waits_at_least_the_retry_after(hub, storage, clock, src):
    hub.faults.fail(429, times=2, path=r"POST .*/commit/", retry_after_s=30)
    storage.put(src, "run/a.bin")
    assert len(clock.sleeps) == 2 and all(30 <= s <= 31 for s in clock.sleeps)
    assert hub.state.files("team/runs")["run/a.bin"] == src.read_bytes()


def test_a_5xx_burst_is_survived_with_backoff_and_one_commit(hub, storage, clock, src):
    before = len(commits(hub))
    hub.faults.fail(503, times=3, path=r"POST .*/commit/")
    storage.put(src, "run/a.bin")
    assert len(clock.sleeps) == 3
    assert all(2**n <= s <= 2**n + 0.5 for n, s in enumerate(clock.sleeps))
    assert len(commits(hub)) == before + 1


def test_a_longer_outage_fails_transient_once_retried(hub, storage, clock, src):
    hub.faults.fail(502, times=99, path=r"POST .*/commit/")
    with pytest.raises(StorageError) as info:
        storage.put(src, "run/a.bin")
    assert info.value.transient and was_retried(info.value)
    assert len(clock.sleeps) == POLICY.attempts - 1


def test_an_answer_lost_after_the_commit_landed_makes_no_duplicate(hub, storage, src):
    before = len(commits(hub))
    hub.faults.drop_after_commit()
    storage.put(src, "run/a.bin")
    assert len(commits(hub)) == before + 1  # found by its id among the commits, not committed again
    assert hub.requests_matching(r"GET .*/commits/main")


def test_a_lost_answer_of_a_folder_commit_makes_no_duplicate(hub, storage, tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"w" * 64)
    (tmp_path / "COMMIT.json").write_bytes(b"{}")
    before = len(commits(hub))
    hub.faults.drop_after_commit()
    storage.commit_folder(tmp_path, "run/checkpoints/step-00000002", ["lora.safetensors", "COMMIT.json"])
    assert len(commits(hub)) == before + 1


def test_a_truncated_download_is_caught_and_fetched_again(hub, storage, clock, src, tmp_path):
    storage.put(src, "run/a.bin")
    hub.faults.truncate_next_download()
    storage.get("run/a.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert len(clock.sleeps) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_two_sessions_racing_for_the_lease_never_both_hold_it(hub, storage, clock):
    lease_a = Lease(storage, "run", "colab:a:1", clock=clock)
    other = {"holder": "kaggle:b:2", "token": "b" * 32, "since": "now", "heartbeat_wall": clock.wall()}
    # A reads "no lease" at head H; B's lease lands before A's commit. A's commit (parent H) gets 412;
    # A reads again, sees B's fresh lease and refuses. Write-settle-read would have let both believe.
    hub.faults.race_next_commit(files={"run/lease.json": json.dumps(other).encode()})
    with pytest.raises(LeaseHeld) as info:
        lease_a.acquire()
    assert "kaggle:b:2" in str(info.value)
    assert read_lease(storage, "run").holder == "kaggle:b:2"
    assert hub.requests_matching(r"POST .*/commit/")  # A did try, and lost the swap


def test_a_commit_racing_the_acquire_makes_it_decide_again(hub, storage, clock):
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    hub.faults.race_next_commit()
    lease.acquire()
    assert read_lease(storage, "run").holder == "colab:a:1"
    assert len(clock.sleeps) == 1 and clock.sleeps[0] < 1.0  # a jittered pause before deciding again, no settle


def test_a_taken_lease_stops_the_old_holders_heartbeat(hub, clock):
    hub.state.orgs["team"] = {"alice", "bob"}
    first, second = open_as(hub, "alice", clock), open_as(hub, "bob", clock)
    old = Lease(first, "run", "colab:a:1", clock=clock)
    old.acquire()
    Lease(second, "run", "kaggle:b:2", clock=clock).acquire(take_over=True)
    with pytest.raises(LeaseHeld):
        old.heartbeat()
    old.release()  # leaves the new holder's lease alone
    assert read_lease(second, "run").holder == "kaggle:b:2"


def test_release_by_swap_removes_the_lease(storage, clock):
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    lease.acquire()
    lease.heartbeat()
    lease.release()
    assert read_lease(storage, "run") is None
