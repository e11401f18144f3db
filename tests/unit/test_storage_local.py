"""LocalStorage passes the storage contract; open_storage picks the right backend or says what it accepts."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from runner.errors import StorageError, UsageError
from runner.storage.local import TMP_MARK, LocalStorage
from runner.storage.url import VM_STORAGE_OPT_IN, check_vm_storage, open_storage
from tests.storage_contract import StorageContract


class TestLocalContract(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        return LocalStorage(tmp_path / "store")


def _src(tmp_path: Path, data: bytes = b"data") -> Path:
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path


def test_list_ignores_temporary_files(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    storage.put(_src(tmp_path), "run/a")
    (tmp_path / "store" / "run" / f".a{TMP_MARK}123").write_bytes(b"half")
    assert storage.list("run") == ["run/a"]


def test_listing_sweeps_a_dead_puts_temp_that_is_alone_in_its_folder(tmp_path):
    import os
    import time

    from runner.storage.local import STALE_TEMP_S

    storage = LocalStorage(tmp_path / "store")
    storage.put(_src(tmp_path), "run/checkpoints/step-1/COMMIT.json")
    orphan = tmp_path / "store" / "run" / "checkpoints" / "step-2" / f".lora{TMP_MARK}9"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half")  # a put killed mid-copy on a VM that died: nothing else in step-2
    old = time.time() - STALE_TEMP_S - 60
    os.utime(orphan, (old, old))
    running = tmp_path / "store" / "run" / "checkpoints" / "step-3" / f".lora{TMP_MARK}7"
    running.parent.mkdir(parents=True)
    running.write_bytes(b"in flight")  # a put still running elsewhere: recent, kept
    assert storage.list("run/checkpoints") == ["run/checkpoints/step-1/COMMIT.json"]
    assert not orphan.parent.exists() and running.exists()


def test_failed_put_leaves_old_content_and_no_temp(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "store")
    storage.put(_src(tmp_path, b"old"), "run/k")

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("runner.storage.local.os.replace", boom)
    with pytest.raises(StorageError) as info:
        storage.put(_src(tmp_path, b"new"), "run/k")
    assert "disk full" in str(info.value) and "run/k" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "store" / "run").iterdir()) == ["k"]
    storage.get("run/k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"old"


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "run/../../x", "a\\b", f"run/x{TMP_MARK}1"])
def test_bad_keys_are_refused(tmp_path, key):
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put(_src(tmp_path), key)


def test_delete_prunes_empty_folders_but_not_root(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    storage.put(_src(tmp_path), "run/checkpoints/step-00000001/lora.safetensors")
    storage.delete("run/checkpoints/step-00000001/lora.safetensors")
    assert not (tmp_path / "store" / "run").exists()
    assert (tmp_path / "store").is_dir()
    storage.put(_src(tmp_path), "run/checkpoints/step-00000002/lora.safetensors")
    assert storage.exists("run/checkpoints/step-00000002/lora.safetensors")


@pytest.mark.parametrize("url", ["", "  ", "s3://bucket/run", "gdrive:folder", "gdrive://", "hf:user/repo", "file://"])
def test_open_storage_refuses_unknown_forms(url):
    with pytest.raises(UsageError) as info:
        open_storage(url)
    assert "gdrive://FOLDER_ID" in str(info.value) and "/path/to/folder" in str(info.value)


def test_open_storage_local_forms(tmp_path):
    for url in (str(tmp_path / "a"), f"file://{tmp_path / 'b'}"):
        storage = open_storage(url)
        assert isinstance(storage, LocalStorage)
        assert storage.root == Path(url.removeprefix("file://"))


def test_open_storage_drive_forms_use_the_drive_backends(monkeypatch):
    calls = []
    fake_gdrive = type(sys)("runner.storage.gdrive")
    fake_gdrive.open_gdrive = lambda url, env=None: calls.append(("gdrive", url, env)) or "G"
    fake_colab = type(sys)("runner.storage.colab")
    fake_colab.open_colab_drive = lambda url, env=None: calls.append(("colab", url, env)) or "C"
    monkeypatch.setitem(sys.modules, "runner.storage.gdrive", fake_gdrive)
    monkeypatch.setitem(sys.modules, "runner.storage.colab", fake_colab)
    env = {"RELAY_GDRIVE_CREDENTIALS": "x"}
    assert open_storage("gdrive://FOLDER", env=env) == "G"
    assert open_storage("drive") == "C"
    assert open_storage("/content/drive/MyDrive/relay") == "C"
    assert calls == [
        ("gdrive", "gdrive://FOLDER", env),
        ("colab", "drive", None),
        ("colab", "/content/drive/MyDrive/relay", None),
    ]


def test_open_storage_missing_backend_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "runner.storage.gdrive", None)  # import fails like an absent module
    with pytest.raises(UsageError, match="Google Drive API backend cannot be loaded"):
        open_storage("gdrive://FOLDER")


@pytest.mark.parametrize(
    ("url", "meant"),
    [("gdrive//My Drive/relay", "gdrive://My Drive/relay"), ("gdrive:/abc", "gdrive://abc"),
     ("hf//me/runs", "hf://me/runs"), ("My Drive/relay", "gdrive://My Drive/relay"),
     ("MyDrive/relay", "gdrive://MyDrive/relay")],
)  # fmt: skip
def test_a_mistyped_remote_form_is_refused_and_makes_no_folder(tmp_path, monkeypatch, url, meant):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="mistyped|Google Drive path") as info:
        open_storage(url)
    assert meant in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created on this machine


def test_a_folder_on_a_notebook_vm_needs_an_opt_in_and_gets_a_warning():
    with pytest.raises(UsageError, match="deleted with the VM") as info:
        check_vm_storage("/content/x", "colab", {})
    assert VM_STORAGE_OPT_IN in info.value.hint
    with pytest.raises(UsageError, match="Kaggle VM"):
        check_vm_storage("file:///kaggle/working/runs", "kaggle", {})
    assert "deleted with the VM" in check_vm_storage("/content/x", "colab", {VM_STORAGE_OPT_IN: "1"})
    for remote in ("gdrive://My Drive/relay", "hf://me/runs", "drive", "/content/drive/MyDrive/relay"):
        assert check_vm_storage(remote, "colab", {}) is None
    assert check_vm_storage("./relay-runs", "local", {}) is None  # a machine of one's own keeps its disk
    with pytest.raises(UsageError, match="mistyped 'gdrive://x'"):
        check_vm_storage("gdrive//x", "colab", {VM_STORAGE_OPT_IN: "1"})
