"""The behaviour every Storage backend must show.

Owns: `StorageContract`, a mixin of pytest tests. A backend's test module
subclasses it and provides a `storage` fixture (and, optionally, `tmp_path`
is used for local scratch files):

    class TestLocal(StorageContract):
        @pytest.fixture
        def storage(self, tmp_path):
            return LocalStorage(tmp_path / "store")

Each test states something the checkpoint protocol relies on. Must not depend
on a backend's internals or on listing order.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from runner.errors import StorageError
from runner.storage import Storage

LARGE_BYTES = 8 * 1024 * 1024


def _file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _read(storage: Storage, key: str, scratch: Path) -> bytes:
    dest = scratch / "read" / key.replace("/", "__")
    storage.get(key, dest)
    return dest.read_bytes()


class StorageContract:
    """Subclass and provide a `storage` fixture."""

    def test_is_a_storage(self, storage):
        assert isinstance(storage, Storage)
        assert isinstance(storage.url, str) and storage.url

    def test_round_trip_keeps_bytes(self, storage, tmp_path):
        data = bytes(range(256)) * 17
        storage.put(_file(tmp_path, "a.bin", data), "run/a.bin")
        assert storage.exists("run/a.bin")
        assert _read(storage, "run/a.bin", tmp_path) == data

    def test_empty_file_round_trips(self, storage, tmp_path):
        storage.put(_file(tmp_path, "empty", b""), "run/empty")
        assert storage.exists("run/empty")
        assert _read(storage, "run/empty", tmp_path) == b""

    def test_put_twice_keeps_latest_once(self, storage, tmp_path):
        storage.put(_file(tmp_path, "v1", b"first version"), "run/lease.json")
        storage.put(_file(tmp_path, "v2", b"second"), "run/lease.json")
        assert _read(storage, "run/lease.json", tmp_path) == b"second"
        assert storage.list("run") == ["run/lease.json"]

    def test_nested_keys(self, storage, tmp_path):
        storage.put(_file(tmp_path, "x", b"deep"), "run/checkpoints/step-00000400/lora.safetensors")
        assert storage.list("run/checkpoints/") == ["run/checkpoints/step-00000400/lora.safetensors"]
        assert _read(storage, "run/checkpoints/step-00000400/lora.safetensors", tmp_path) == b"deep"

    def test_list_many_keys_by_prefix(self, storage, tmp_path):
        src = _file(tmp_path, "small", b"x")
        expected = {f"run/a/f{i:03d}" for i in range(200)} | {f"run/a/sub/g{i:02d}" for i in range(30)}
        others = {f"run/ab/h{i:02d}" for i in range(20)}
        for key in sorted(expected | others):
            storage.put(src, key)
        assert sorted(storage.list("run/a")) == sorted(expected)
        assert sorted(storage.list("run/a/")) == sorted(expected)
        assert sorted(storage.list("run/ab")) == sorted(others)
        assert sorted(storage.list("run")) == sorted(expected | others)

    def test_names_with_spaces_and_unicode(self, storage, tmp_path):
        key = "run/samples/step-00000400/a cat ninja, Naruto style – 0.png"
        storage.put(_file(tmp_path, "img", b"png"), key)
        assert storage.list("run/samples") == [key]
        assert _read(storage, key, tmp_path) == b"png"

    def test_exists_is_about_files_not_folders(self, storage, tmp_path):
        storage.put(_file(tmp_path, "x", b"x"), "run/checkpoints/step-00000001/COMMIT.json")
        assert storage.exists("run/checkpoints/step-00000001/COMMIT.json")
        assert not storage.exists("run/checkpoints/step-00000001")

    def test_get_replaces_an_existing_local_file(self, storage, tmp_path):
        storage.put(_file(tmp_path, "short", b"new"), "run/state.json")
        dest = _file(tmp_path, "dest", b"a much longer old content")
        storage.get("run/state.json", dest)
        assert dest.read_bytes() == b"new"

    def test_list_of_missing_prefix_is_empty(self, storage):
        assert storage.list("no-such-run/") == []

    def test_missing_key(self, storage, tmp_path):
        assert not storage.exists("run/missing.json")
        with pytest.raises(StorageError) as info:
            storage.get("run/missing.json", tmp_path / "out")
        assert info.value.transient is False
        assert "missing.json" in str(info.value)
        assert not (tmp_path / "out").exists()

    def test_delete(self, storage, tmp_path):
        storage.put(_file(tmp_path, "d", b"bye"), "run/d")
        storage.put(_file(tmp_path, "e", b"stay"), "run/e")
        storage.delete("run/d")
        assert not storage.exists("run/d")
        assert storage.list("run") == ["run/e"]

    def test_delete_missing_key_is_fine(self, storage):
        storage.delete("run/never-was")
        assert not storage.exists("run/never-was")

    def test_large_file(self, storage, tmp_path):
        data = os.urandom(LARGE_BYTES)
        storage.put(_file(tmp_path, "big", data), "run/cache/latents-00000.safetensors")
        assert _read(storage, "run/cache/latents-00000.safetensors", tmp_path) == data

    def test_readers_never_see_a_partial_write(self, storage, tmp_path):
        old, new = b"o" * (2 * 1024 * 1024), b"n" * (3 * 1024 * 1024)
        storage.put(_file(tmp_path, "old", old), "run/blob")
        src_new = _file(tmp_path, "new", new)
        seen: list[bytes] = []
        done = threading.Event()

        def read_repeatedly() -> None:
            i = 0
            while not done.is_set() or i < 3:
                dest = tmp_path / "reader" / f"r{i}"
                storage.get("run/blob", dest)
                seen.append(dest.read_bytes())
                dest.unlink()
                i += 1

        reader = threading.Thread(target=read_repeatedly)
        reader.start()
        try:
            for _ in range(5):
                storage.put(src_new, "run/blob")
        finally:
            done.set()
            reader.join(timeout=60)
        assert seen and all(content in (old, new) for content in seen)
        assert seen[-1] == new
