"""COMMIT.json: written last, lists every file, and catches any file that differs."""

from __future__ import annotations

import json

import pytest

from runner.checkpoint.manifest import COMMIT, commit_folder, fetch_folder, verify_dir, write_manifest
from runner.clock import FakeClock
from runner.errors import CheckpointCorrupt, StorageError
from runner.storage.local import TMP_MARK, LocalStorage
from tests.flaky import FlakyStorage


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    (d / "lora.safetensors").write_bytes(b"L" * 1000)
    (d / "optimizer.safetensors").write_bytes(b"O" * 3000)
    return d


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "store")


def test_manifest_lists_every_file_with_size_and_hash(folder):
    manifest = write_manifest(folder, {"step": 4}, clock=FakeClock())
    on_disk = json.loads((folder / COMMIT).read_text())
    assert on_disk == manifest
    assert sorted(manifest["files"]) == ["lora.safetensors", "optimizer.safetensors"]
    assert manifest["files"]["lora.safetensors"]["size"] == 1000
    assert len(manifest["files"]["lora.safetensors"]["sha256"]) == 64
    assert manifest["meta"] == {"step": 4} and manifest["version"] == 1
    assert manifest["created"].endswith("Z")
    assert verify_dir(folder, manifest) == []


def test_manifest_skips_leftover_temporaries(folder):
    (folder / f".{COMMIT}.fetched").write_bytes(b"{}")
    (folder / f".lora.safetensors{TMP_MARK}abc").write_bytes(b"half")
    manifest = write_manifest(folder, {})
    assert sorted(manifest["files"]) == ["lora.safetensors", "optimizer.safetensors"]


def test_verify_names_each_problem(folder):
    manifest = write_manifest(folder, {})
    (folder / "lora.safetensors").write_bytes(b"L" * 999 + b"X")  # same size, one byte flipped
    (folder / "optimizer.safetensors").unlink()
    problems = verify_dir(folder, manifest)
    assert len(problems) == 2
    assert problems[0].startswith("lora.safetensors: sha256")
    assert problems[1] == "optimizer.safetensors: missing"


def test_commit_puts_commit_json_last_and_reports_progress(folder, storage):
    write_manifest(folder, {"step": 1})
    flaky = FlakyStorage(storage)
    seen = []
    commit_folder(flaky, folder, "run/checkpoints/step-00000001", progress=lambda d, t: seen.append((d, t)))
    puts = [key for op, key in flaky.calls if op == "put"]
    assert puts[-1] == f"run/checkpoints/step-00000001/{COMMIT}"
    assert len(puts) == 3
    total = 4000 + (folder / COMMIT).stat().st_size
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_interrupted_commit_leaves_no_commit_json(folder, storage):
    write_manifest(folder, {})
    flaky = FlakyStorage(storage, fail_ops={"put": 1}, key_contains="optimizer", transient=False)
    with pytest.raises(StorageError):
        commit_folder(flaky, folder, "run/c")
    assert not storage.exists(f"run/c/{COMMIT}")
    with pytest.raises(CheckpointCorrupt, match="not committed"):
        fetch_folder(storage, "run/c", folder.parent / "back")


def test_fetch_round_trip(folder, storage, tmp_path):
    sent = write_manifest(folder, {"step": 7})
    commit_folder(storage, folder, "run/c/")
    back = tmp_path / "back"
    got = fetch_folder(storage, "run/c", back)
    assert got == sent
    for name in ("lora.safetensors", "optimizer.safetensors", COMMIT):
        assert (back / name).read_bytes() == (folder / name).read_bytes()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:500]), "lora.safetensors: 500 bytes, COMMIT.json says 1000"),
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "lora.safetensors: sha256"),
        (lambda p: p.unlink(), "lora.safetensors is listed in COMMIT.json but cannot be read"),
    ],
)
def test_fetch_names_the_damaged_file(folder, storage, tmp_path, damage, expected):
    write_manifest(folder, {})
    commit_folder(storage, folder, "run/c")
    damage(storage.root / "run/c/lora.safetensors")
    with pytest.raises(CheckpointCorrupt) as info:
        fetch_folder(storage, "run/c", tmp_path / "back")
    assert expected in str(info.value)
    assert info.value.path.endswith("run/c")
    assert not (tmp_path / "back" / COMMIT).exists()  # the local copy is not marked committed


@pytest.mark.parametrize(
    "commit_text",
    [
        "{not json",
        json.dumps({"version": 1}),
        json.dumps({"version": 99, "files": {}}),
        json.dumps({"version": 1, "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}}),
        json.dumps({"version": 1, "files": {"a": {"size": "1"}}}),
    ],
)
def test_fetch_refuses_a_bad_manifest(folder, storage, tmp_path, commit_text):
    write_manifest(folder, {})
    commit_folder(storage, folder, "run/c")
    (storage.root / "run/c" / COMMIT).write_text(commit_text)
    with pytest.raises(CheckpointCorrupt, match="COMMIT.json"):
        fetch_folder(storage, "run/c", tmp_path / "back")


def test_fetch_lets_transient_errors_through(folder, storage, tmp_path):
    write_manifest(folder, {})
    commit_folder(storage, folder, "run/c")
    flaky = FlakyStorage(storage, fail_ops={"get": 1}, key_contains="lora", transient=True)
    with pytest.raises(StorageError) as info:
        fetch_folder(flaky, "run/c", tmp_path / "back")
    assert info.value.transient and not isinstance(info.value, CheckpointCorrupt)


def test_commit_refuses_a_folder_changed_after_its_manifest(folder, storage):
    write_manifest(folder, {})
    (folder / "lora.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointCorrupt, match="changed after COMMIT.json"):
        commit_folder(storage, folder, "run/c")
    assert storage.list("run") == []
