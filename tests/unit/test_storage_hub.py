"""The Hub backend against the stand-in Hub: the storage contract, opening a repo, atomic folders, CAS."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.clock import FakeClock
from runner.errors import EXIT_USAGE, UsageError
from runner.storage.hub import HubAccessError, HubLimits, open_hub, parse_hf_url
from runner.storage.retry import RetryPolicy
from runner.storage.url import open_storage
from tests.hubserver import HubServer
from tests.storage_contract import StorageContract

FAST = RetryPolicy(attempts=5, initial_s=1.0, max_s=8.0, jitter_s=0.5)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def env_for(hub: HubServer, token: str) -> dict[str, str]:
    return {"HF_TOKEN": token, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1"}


def open_as(hub: HubServer, token: str, url: str = "hf://alice/runs", clock=None, limits=None):
    return open_hub(url, env=env_for(hub, token), clock=clock or FakeClock(), retry=FAST, limits=limits)


class TestHubContract(StorageContract):
    @pytest.fixture
    def storage(self, hub):
        return open_as(hub, hub.state.add_token("alice"), "hf://alice/runs/store")


@pytest.mark.parametrize(
    ("url", "repo", "prefix"),
    [("hf://alice/runs", "alice/runs", ""), ("hf://alice/runs/a/b/", "alice/runs", "a/b")],
)
def test_urls_parse(url, repo, prefix):
    assert parse_hf_url(url) == (repo, prefix)


@pytest.mark.parametrize("url", ["hf://alice", "hf://datasets/alice/runs", "hf://alice/runs?token=x", "hf://a/b@dev"])
def test_bad_urls_say_what_to_write(url):
    with pytest.raises(UsageError) as info:
        parse_hf_url(url)
    assert info.value.exit_code == EXIT_USAGE and "hf://" in str(info.value)


def test_first_use_creates_a_private_model_repo_through_open_storage(hub):
    storage = open_storage("hf://alice/runs", env=env_for(hub, hub.state.add_token("alice")))
    assert storage.url == "hf://alice/runs"
    repo = hub.state.repos[("model", "alice/runs")]
    assert repo.private


def test_missing_token_is_a_usage_error_naming_the_variable(hub):
    with pytest.raises(HubAccessError) as info:
        open_hub("hf://alice/runs", env={"HF_ENDPOINT": hub.endpoint})
    assert info.value.exit_code == EXIT_USAGE and "HF_TOKEN" in str(info.value)


def test_read_only_token_is_refused_before_any_write(hub):
    token = hub.state.add_token("alice", role="read")
    with pytest.raises(HubAccessError) as info:
        open_as(hub, token)
    assert info.value.exit_code == EXIT_USAGE and "read-only" in str(info.value)
    assert token not in str(info.value)
    assert ("model", "alice/runs") not in hub.state.repos


def test_missing_repo_without_rights_to_create_it(hub):
    with pytest.raises(HubAccessError) as info:
        open_as(hub, hub.state.add_token("bob"), "hf://alice/runs")
    assert info.value.exit_code == EXIT_USAGE and "may not create" in str(info.value)


def test_a_repo_of_another_type(hub):
    hub.state.add_repo("alice/runs", type="dataset")
    with pytest.raises(HubAccessError) as info:
        open_as(hub, hub.state.add_token("alice"))
    assert "dataset repo" in str(info.value) and info.value.exit_code == EXIT_USAGE


def test_the_token_never_appears_in_errors_or_logs(hub, caplog, tmp_path):
    token = hub.state.add_token("alice")
    storage = open_as(hub, token)
    hub.faults.fail(503, times=99, path="resolve")
    with pytest.raises(Exception) as info:
        storage.get("run/x", tmp_path / "x")
    assert token not in str(info.value) and token not in caplog.text


def _folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_commit_folder_is_one_commit_and_delete_folder_another(hub, tmp_path):
    storage = open_as(hub, hub.state.add_token("alice"))
    before = len(hub.state.commits("alice/runs"))
    folder = _folder(tmp_path, {"lora.safetensors": b"w" * 100, "state.json": b"{}", "COMMIT.json": b"{}"})
    storage.commit_folder(folder, "run/checkpoints/step-00000010", ["lora.safetensors", "state.json", "COMMIT.json"])
    assert len(hub.state.commits("alice/runs")) == before + 1
    assert sorted(storage.list("run/checkpoints")) == [
        f"run/checkpoints/step-00000010/{n}" for n in ("COMMIT.json", "lora.safetensors", "state.json")
    ]
    storage.delete_folder("run/checkpoints/step-00000010")
    assert len(hub.state.commits("alice/runs")) == before + 2
    assert storage.list("run") == []


def test_history_is_squashed_after_deletes_once_commits_pile_up(hub, tmp_path):
    storage = open_as(hub, hub.state.add_token("alice"), limits=HubLimits(squash_every_commits=4))
    src = _folder(tmp_path, {"f": b"x"})
    for i in range(4):
        storage.put(src / "f", f"run/old/{i}")
    storage.delete_folder("run/old")
    assert len(hub.state.commits("alice/runs")) == 1
    assert storage.commits_since_squash == 0


def test_commits_are_spaced_to_stay_under_the_hourly_limit(hub, tmp_path):
    clock = FakeClock()
    limits = HubLimits(commits_per_hour=100, commit_burst=3)
    storage = open_as(hub, hub.state.add_token("alice"), clock=clock, limits=limits)
    src = _folder(tmp_path, {"f": b"x"})
    for i in range(6):
        src.joinpath("f").write_bytes(b"%d" % i)
        storage.put(src / "f", "run/f")
    assert clock.sleeps == pytest.approx([36.0, 36.0, 36.0])
    assert clock.monotonic() * 128 / 3600 < 6  # 6 commits in that time is below 128 an hour


def test_update_if_unchanged_swaps_and_refuses_through_decide(hub):
    storage = open_as(hub, hub.state.add_token("alice"))
    assert storage.update_if_unchanged("run/lease.json", lambda current: b"A" if current is None else None) == b"A"
    seen = []
    storage.update_if_unchanged("run/lease.json", lambda current: seen.append(current) or b"B")
    assert seen == [b"A"] and hub.state.files("alice/runs")["run/lease.json"] == b"B"


def test_update_if_unchanged_decides_again_when_another_commit_lands_first(hub):
    storage = open_as(hub, hub.state.add_token("alice"))
    storage.update_if_unchanged("run/lease.json", lambda current: b"1")
    hub.faults.race_next_commit()
    calls = []
    storage.update_if_unchanged("run/lease.json", lambda current: calls.append(current) or b"2")
    assert calls == [b"1", b"1"]  # the first write hit 412 (the head had moved) and was decided again
    assert hub.state.files("alice/runs")["run/lease.json"] == b"2"


def test_checkpoints_are_one_commit_each_and_rotation_one_more(hub, tmp_path):
    from runner.checkpoint import CheckpointManager

    storage = open_as(hub, hub.state.add_token("alice"))
    manager = CheckpointManager(storage, "run", tmp_path / "work", keep=2, clock=FakeClock())

    def write(step):
        def files(folder):
            (folder / "lora.safetensors").write_bytes(bytes([step]) * 512)
            return {"note": step}

        return files

    before = len(hub.state.commits("alice/runs"))
    for step in (10, 20, 30):
        manager.submit(manager.stage(step, write(step)))
        assert manager.wait(timeout_s=30)
    manager.close()
    titles = [c.title for c in hub.state.commits("alice/runs")[before:]]
    assert len(titles) == 4, titles  # 3 checkpoints + deleting step 10 (one commit each)
    assert manager.committed_steps() == [20, 30]
    restored = manager.latest(tmp_path / "restore")
    assert restored.step == 30 and (restored.dir / "lora.safetensors").read_bytes() == bytes([30]) * 512


def test_the_cli_exits_2_with_what_to_do_for_a_read_only_token(hub, monkeypatch, capsys):
    from runner.cli import main

    token = hub.state.add_token("alice", role="read")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert main(["status", "--storage", "hf://alice/runs"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "read-only" in err and "settings/tokens" in err and token not in err


def test_huggingface_hub_is_imported_only_when_an_hf_url_is_opened():
    import subprocess
    import sys

    code = (
        "import sys, runner.storage.url, runner.storage.hub, runner.publish\n"
        "assert 'huggingface_hub' not in sys.modules, 'imported at module level'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
