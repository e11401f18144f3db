"""The Hub backend under faults, against the stand-in Hub: rate limits, 5xx bursts, an answer lost after
the commit landed, a commit racing a lease, a download cut short."""

from __future__ import annotations

import json

import pytest

from runner.checkpoint.manager import CheckpointManager
from runner.clock import FakeClock
from runner.errors import EXIT_PREEMPTED, EXIT_REFUSED, LeaseHeld, LeaseLapsed, LeaseLost, StorageError
from runner.lease import Lease
from runner.leaserecord import read_lease
from runner.storage.fenced import FencedStorage
from runner.storage.hub import open_hub
from runner.storage.retry import RetryPolicy, was_retried
from tests.hubserver import HubServer
from tests.unit.test_lease import Beats

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


# ---------------------------------------------------------------- one writer, even when the Hub is slow


def _manager(storage, lease, tmp_path, name, clock):
    """The session's wiring: checkpoints written through the lease's fence."""
    fenced = FencedStorage(storage, lease.assert_held)
    return CheckpointManager(fenced, "run", tmp_path / name, keep=1, clock=clock, upload_attempts=1)


def _commit_step(manager: CheckpointManager, step: int) -> bool:
    manager.submit(manager.stage(step, lambda d: (d / "lora.safetensors").write_bytes(bytes([step]) * 256) and {}))
    return manager.wait()


def _steps(hub: HubServer) -> list[int]:
    files = hub.state.files("team/runs")
    return sorted(int(p.split("/")[2][5:]) for p in files if p.startswith("run/checkpoints/") and "COMMIT" in p)


def test_after_a_takeover_the_old_holder_commits_and_deletes_nothing(hub, clock, tmp_path):
    """A takes the run; its lease lapses (its heartbeats stopped landing); B takes over and commits step 20.
    A's next checkpoint (step 30, keep=1: it would delete B's step 20) is refused by the Hub itself: the
    commit's parent is a head where A held the lease, and A stops with LeaseLost."""
    hub.state.orgs["team"] = {"alice", "bob"}
    first, second = open_as(hub, "alice", clock), open_as(hub, "bob", clock)
    old = Lease(first, "run", "colab:a:1", clock=clock)
    old.acquire()
    old_ckpts = _manager(first, old, tmp_path, "a", clock)
    assert _commit_step(old_ckpts, 10)
    new = Lease(second, "run", "kaggle:b:2", clock=Clock2(clock))
    new.clock.skew = 301  # B's wall clock sees A's heartbeat 301 s old: lapsed, taken without --take-over
    new.acquire()
    assert _commit_step(_manager(second, new, tmp_path, "b", new.clock), 20)
    assert _steps(hub) == [20]  # B rotated A's step 10 away (keep=1), as the one writer now
    with pytest.raises(LeaseLost) as info:
        _commit_step(old_ckpts, 30)
    assert info.value.exit_code == EXIT_REFUSED and "kaggle:b:2" in str(info.value)
    assert _steps(hub) == [20]  # nothing of B's deleted, no step 30
    assert not [p for p in hub.state.files("team/runs") if "step-00000030" in p]
    with pytest.raises(LeaseLost):
        old.check()  # the session's next check between steps stops it
    old.release()
    assert read_lease(second, "run").holder == "kaggle:b:2"


class Clock2:
    """Another machine's clock: the same monotonic time, a wall clock `skew` seconds ahead."""

    def __init__(self, base: FakeClock) -> None:
        self.base, self.skew = base, 0.0

    def monotonic(self) -> float:
        return self.base.monotonic()

    def wall(self) -> float:
        return self.base.wall() + self.skew

    def sleep(self, seconds: float) -> None:
        self.base.sleep(seconds)


def test_a_takeover_landing_while_a_commit_is_in_flight_fails_that_commit(hub, storage, clock, tmp_path):
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    lease.acquire()
    theirs = {"holder": "kaggle:b:2", "token": "b" * 32, "since": "now", "heartbeat_wall": clock.wall()}
    hub.faults.take_over("run/lease.json", json.dumps(theirs).encode())
    with pytest.raises(LeaseLost):
        storage.commit_folder(_folder(tmp_path), "run/checkpoints/step-00000005", ["lora.safetensors"])
    assert not [p for p in hub.state.files("team/runs") if "step-00000005" in p]
    assert read_lease(storage, "run").holder == "kaggle:b:2"


def test_commits_of_the_holder_itself_and_of_others_runs_do_not_stop_it(hub, storage, clock, tmp_path):
    """The fence refuses only when the lease changed hands: a commit of another run in the same repo moves
    the head too; the holder re-reads the lease there, finds it still its own, and commits."""
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    lease.acquire()
    hub.faults.race_next_commit(files={"other-run/run.json": b"{}"})
    storage.commit_folder(_folder(tmp_path), "run/checkpoints/step-00000005", ["lora.safetensors"])
    lease.heartbeat()
    storage.delete_folder("run/checkpoints/step-00000005")
    assert not [p for p in hub.state.files("team/runs") if "step-00000005" in p]
    lease.release()
    assert read_lease(storage, "run") is None


def _folder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "lora.safetensors").write_bytes(b"w" * 128)
    return folder


def test_a_heartbeat_behind_a_429_never_lets_the_lease_lapse_unnoticed(hub, storage, clock):
    """The Hub answers every commit with 429, Retry-After: 3600 and RateLimit r=0;t=3600. No retry waits past
    the lease's lapse; the heartbeat gives up, tries again closer to it, and declares the lease lapsed while
    it is still valid: the session stops before another may take the run."""
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    lease.acquire()
    acquired_at = clock.monotonic()
    hub.faults.fail(429, times=10_000, path=r"POST .*/commit/", retry_after_s=3600, ratelimit_reset_s=3600)
    beats = Beats(clock, 100)
    heartbeat = lease.start_heartbeat(wait=beats)
    heartbeat._thread.join(20)
    assert isinstance(heartbeat.lost, LeaseLapsed) and heartbeat.beats == 0
    assert clock.monotonic() - acquired_at < lease.timeout_s  # noticed before anyone may call it dead
    assert all(s < lease.timeout_s for s in clock.sleeps)  # never held for the hour the Hub asked
    with pytest.raises(LeaseLapsed) as info:
        lease.check()
    assert info.value.exit_code == EXIT_PREEMPTED
    with pytest.raises(LeaseLapsed):
        lease.assert_held()  # and the fence refuses every write from now on


def test_the_ratelimit_header_is_honoured_and_a_429_names_its_status(hub, storage, clock, src):
    hub.faults.fail(429, times=1, path=r"POST .*/commit/", ratelimit_reset_s=45)
    storage.put(src, "run/a.bin")
    assert len(clock.sleeps) == 1 and 45 <= clock.sleeps[0] <= 46  # the RateLimit reset, not a 1 s backoff
    hub.faults.fail(429, times=99, path=r"POST .*/commit/", retry_after_s=5)
    with pytest.raises(StorageError) as info:
        storage.put(src, "run/b.bin")
    assert "HTTP 429" in str(info.value) and "per hour" in str(info.value)


def test_a_hung_commit_times_out_and_is_retried(hub, clock, src, monkeypatch):
    hub.state.orgs["team"] = {"alice"}
    env = {"HF_TOKEN": hub.state.add_token("alice"), "HF_ENDPOINT": hub.endpoint, "RELAY_HUB_TIMEOUT_S": "1"}
    storage = open_hub("hf://team/runs", env=env, clock=clock, retry=POLICY)
    hub.faults.hang(1, path=r"POST .*/commit/", seconds=3)
    storage.put(src, "run/a.bin")
    assert hub.faults.hung == 1 and len(clock.sleeps) == 1  # one timeout, one retry under the policy
    assert hub.state.files("team/runs")["run/a.bin"] == src.read_bytes()


def test_a_lagging_repo_info_blocks_neither_start_nor_release(hub, storage, clock):
    """Repo info may come from a cache that lags the branch; the head for a compare-and-swap comes from the
    commit listing, so a lease is taken and released at the first try."""
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    hub.faults.lag_repo_info(times=1000)
    lease.acquire()
    lease.heartbeat()
    lease.release()
    assert read_lease(storage, "run") is None
    assert not [s for s in clock.sleeps]  # no conflict, no retry


def test_safetensors_go_up_as_lfs_and_come_back_intact(hub, storage, tmp_path):
    folder = _folder(tmp_path)
    (folder / "lora.safetensors").write_bytes(bytes(range(256)) * 64)
    storage.commit_folder(folder, "run/x", ["lora.safetensors"])
    assert hub.requests_matching(r"PUT /lfs-upload/") and hub.requests_matching(r"lfs/objects/batch")
    storage.get("run/x/lora.safetensors", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == bytes(range(256)) * 64


def test_a_failed_lfs_upload_and_an_html_error_page_are_storage_errors(hub, storage, clock, tmp_path):
    hub.faults.fail(400, times=10_000, path=r"PUT /lfs-upload/")  # (a 5xx is retried inside the client too)
    with pytest.raises(StorageError) as info:
        storage.commit_folder(_folder(tmp_path), "run/x", ["lora.safetensors"])
    assert "the file upload failed" in str(info.value) and "HTTP 400" in str(info.value)
    assert not info.value.transient and clock.sleeps == []  # a refused upload is not retried
    from runner.storage import hubhttp

    error = hubhttp.translate(json.JSONDecodeError("Expecting value", "<html>", 0), "publish", "hf://t/r", "", str)
    assert isinstance(error, StorageError) and "not JSON" in str(error)
    error = hubhttp.translate(RuntimeError("Error while uploading 'x' to the Hub."), "commit", "hf://t/r", "", str)
    assert isinstance(error, StorageError) and error.transient and "upload failed" in str(error)


def test_a_release_the_hub_refuses_says_why_and_does_not_fail_the_run(hub, storage, clock):
    lease = Lease(storage, "run", "colab:a:1", clock=clock)
    lease.acquire()
    hub.faults.fail(503, times=10_000, path=r"POST .*/commit/")
    why = lease.release()
    assert why and "not released" in why and "--take-over" in why and "HTTP 503" in why
