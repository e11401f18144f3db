"""`relay publish`: a finished run's final/ lands in a Hugging Face model repo as one commit."""

from __future__ import annotations

import pytest

from runner.checkpoint.manifest import commit_folder, write_manifest
from runner.cli import main
from runner.errors import EXIT_OK, EXIT_USAGE
from runner.profile import PublishConfig
from runner.publish import publish_at_completion
from runner.storage.local import LocalStorage
from tests.hubserver import HubServer

FILES = {
    "pytorch_lora_weights.safetensors": b"diffusers lora",
    "naruto.kohya.safetensors": b"kohya lora",
    "README.md": b"---\nbase_model: x\n---\n# naruto\n![base vs LoRA](samples.png)\n",
    "samples.png": b"\x89PNG grid",
}


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_TOKEN", server.state.add_token("alice"))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def finished(tmp_path):
    """A local run store whose run 'naruto' has a committed final/."""
    local = tmp_path / "final"
    local.mkdir()
    for name, data in FILES.items():
        (local / name).write_bytes(data)
    write_manifest(local, {"step": 5})
    storage = LocalStorage(tmp_path / "store")
    commit_folder(storage, local, "naruto/final")
    return storage


def test_publish_pushes_final_in_one_commit_to_a_public_repo(hub, finished, capsys):
    code = main(["publish", "--storage", finished.url, "--run", "naruto", "--repo", "alice/naruto-lora", "--public"])
    assert code == EXIT_OK, capsys.readouterr().err
    repo = hub.state.repos[("model", "alice/naruto-lora")]
    assert not repo.private
    assert hub.state.files("alice/naruto-lora") == FILES  # no COMMIT.json: Relay's bookkeeping stays behind
    assert len(repo.commits) == 2  # the repo's initial commit and ours
    assert "huggingface.co/alice/naruto-lora" in capsys.readouterr().out


def test_publish_defaults_to_a_private_repo_named_after_the_run(hub, finished):
    assert main(["publish", "--storage", finished.url, "--run", "naruto"]) == EXIT_OK
    assert hub.state.repos[("model", "alice/naruto")].private


def test_publishing_an_unfinished_run_says_what_to_do(hub, tmp_path, capsys):
    storage = LocalStorage(tmp_path / "store")
    assert main(["publish", "--storage", storage.url, "--run", "naruto", "--repo", "alice/x"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "relay export" in err and "alice" not in {r[1].split("/")[0] for r in hub.state.repos}


def test_publish_at_completion_is_opt_in(hub, finished):
    assert publish_at_completion(finished, "naruto", PublishConfig()) is None
    assert not hub.state.repos
    done = publish_at_completion(finished, "naruto", PublishConfig(enabled=True, repo="alice/auto"))
    assert done is not None and done.repo_id == "alice/auto"
    assert sorted(done.files) == sorted(FILES)
