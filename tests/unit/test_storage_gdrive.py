"""The Drive API backend against the local fake Drive (real pydrive2 client), and the Colab mount backend."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from runner.clock import FakeClock
from runner.errors import StorageError, UsageError
from runner.storage.colab import ColabDriveStorage, open_colab_drive
from runner.storage.credentials import parse_credentials
from runner.storage.gdrive import DriveStorage, RetryPolicy, connect, parse_gdrive_url
from runner.storage.url import open_storage
from tests.fakedrive import FOLDER_MIME, ROOT_ID, FakeDrive, make_fake_account
from tests.storage_contract import StorageContract


@pytest.fixture
def fake():
    with FakeDrive() as server:
        yield server


def drive_storage(fake: FakeDrive, clock: FakeClock | None = None, base: str | None = None) -> DriveStorage:
    credentials = parse_credentials(json.dumps(fake.add_account()), "test credentials")
    base = base or fake.add_folder("root", "relay")
    client = connect(credentials, fake.endpoint)
    return DriveStorage(client, url=f"gdrive://{base}", base_id=base, clock=clock or FakeClock(), retry=RetryPolicy())


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


class TestDriveContract(StorageContract):
    @pytest.fixture
    def storage(self, fake):
        return drive_storage(fake)


class FakeMounter:
    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        self.calls: list[str] = []

    def mount(self, mount_point: str) -> None:
        self.calls.append("mount")
        (Path(mount_point) / "MyDrive").mkdir(parents=True, exist_ok=True)

    def flush_and_unmount(self, timeout_ms: int) -> None:
        self.calls.append("flush")
        (self.mount_point / "MyDrive").rename(self.mount_point / "unmounted")  # as if the mount went away


class TestColabContract(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        mount = tmp_path / "drive"
        return open_colab_drive("drive", mounter=FakeMounter(mount), mount_point=mount)


# ---- URLs and opening -----------------------------------------------------------------------


def test_url_forms():
    assert parse_gdrive_url("gdrive://1AbC-d_9") == ("1AbC-d_9", ())
    assert parse_gdrive_url("gdrive://1AbC/runs/a") == ("1AbC", ("runs", "a"))
    assert parse_gdrive_url("gdrive://My Drive/relay") == ("root", ("relay",))
    for bad in ("gdrive://", "gdrive://has space/x", "gdrive://ID?token=abc", "s3://x"):
        with pytest.raises(UsageError):
            parse_gdrive_url(bad)


def test_open_storage_from_env_talks_to_the_endpoint(fake, tmp_path):
    env = make_fake_account(fake, tmp_path / "alice")
    folder = fake.add_folder("root", "shared-runs")
    storage = open_storage(f"gdrive://{folder}", env=env)
    storage.put(write(tmp_path, "f", b"data"), "run/run.json")
    [stored] = fake.find("run/run.json", root=folder)
    assert stored.content == b"data"
    assert storage.url == f"gdrive://{folder}"


def test_path_form_creates_folders_under_my_drive(fake, tmp_path):
    env = make_fake_account(fake, tmp_path / "bob")
    storage = open_storage("gdrive://My Drive/relay/runs", env=env)
    storage.put(write(tmp_path, "f", b"x"), "a/b.bin")
    [stored] = fake.find("relay/runs/a/b.bin", root=ROOT_ID)
    assert stored.content == b"x"
    assert [f.mime_type for f in fake.children(ROOT_ID, "relay")] == [FOLDER_MIME]


def test_missing_folder_fails_at_once_with_a_fix(fake, tmp_path):
    clock = FakeClock()
    storage = drive_storage(fake, clock, base="1NoSuchFolder")
    with pytest.raises(StorageError) as info:
        storage.exists("run/COMMIT.json")
    assert info.value.transient is False
    assert "1NoSuchFolder" in str(info.value) and "shared" in info.value.hint
    assert clock.sleeps == []


# ---- one key, one file ----------------------------------------------------------------------


def test_put_updates_the_same_file_in_place(fake, tmp_path):
    storage = drive_storage(fake)
    storage.put(write(tmp_path, "a", b"one"), "run/lease.json")
    [first] = fake.find("run/lease.json", root=storage._base_id)
    storage.put(write(tmp_path, "b", b"two"), "run/lease.json")
    [second] = fake.find("run/lease.json", root=storage._base_id)
    assert second.id == first.id and second.content == b"two"


def test_duplicates_resolve_to_the_newest_and_put_removes_the_rest(fake, tmp_path):
    storage = drive_storage(fake)
    base = storage._base_id
    run = fake.add_folder(base, "run")
    fake.add_file(run, "state.json", b"old")
    fake.add_file(run, "state.json", b"newest")  # created later: newer modifiedDate
    storage.get("run/state.json", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"newest"
    assert storage.list("run") == ["run/state.json"]
    storage.put(write(tmp_path, "s", b"mine"), "run/state.json")
    assert [f.content for f in fake.find("run/state.json", root=base)] == [b"mine"]


def test_duplicate_folders_resolve_to_the_oldest(fake, tmp_path):
    storage = drive_storage(fake)
    base = storage._base_id
    first = fake.add_folder(base, "run")
    fake.add_file(first, "a.bin", b"in the first")
    fake.add_folder(base, "run")
    storage.put(write(tmp_path, "b", b"b"), "run/b.bin")
    assert sorted(f.title for f in fake.children(first)) == ["a.bin", "b.bin"]


def test_delete_removes_every_duplicate(fake, tmp_path):
    storage = drive_storage(fake)
    run = fake.add_folder(storage._base_id, "run")
    fake.add_file(run, "x", b"1")
    fake.add_file(run, "x", b"2")
    storage.delete("run/x")
    assert fake.find("run/x", root=storage._base_id) == []
    assert not storage.exists("run/x")


def test_stale_listing_does_not_hide_the_commit_marker(fake, tmp_path):
    storage = drive_storage(fake)
    storage.put(write(tmp_path, "l", b"lora"), "run/checkpoints/step-1/lora.safetensors")
    fake.set_stale_listing(10_000)  # files.list now shows nothing created from here on
    storage.put(write(tmp_path, "c", b"{}"), "run/checkpoints/step-1/COMMIT.json")
    assert storage.exists("run/checkpoints/step-1/COMMIT.json")
    storage.get("run/checkpoints/step-1/COMMIT.json", tmp_path / "commit")
    assert (tmp_path / "commit").read_bytes() == b"{}"
    assert set(storage.list("run/checkpoints")) == {
        "run/checkpoints/step-1/lora.safetensors",
        "run/checkpoints/step-1/COMMIT.json",
    }
    storage.put(write(tmp_path, "c2", b"{2}"), "run/checkpoints/step-1/COMMIT.json")  # no duplicate
    assert len(fake.find("run/checkpoints/step-1/COMMIT.json", root=storage._base_id)) == 1


def test_titles_with_quotes_and_backslashes(fake, tmp_path):
    storage = drive_storage(fake)
    key = "run/it's a \\ name.json"
    storage.put(write(tmp_path, "q", b"q"), key)
    assert storage.exists(key) and storage.list("run") == [key]


def test_list_pages_through_results(fake, tmp_path, monkeypatch):
    monkeypatch.setattr("runner.storage.gdrive.PAGE_SIZE", 7)
    storage = drive_storage(fake)
    run = fake.add_folder(storage._base_id, "run")
    for i in range(30):
        fake.add_file(run, f"f{i:02d}", b"x")
    assert storage.list("run") == [f"run/f{i:02d}" for i in range(30)]


def test_bad_key_is_refused(fake):
    storage = drive_storage(fake)
    for key in ("", "/abs", "a//b", "a/../b"):
        with pytest.raises(StorageError):
            storage.exists(key)


# ---- Colab mount ----------------------------------------------------------------------------


def test_colab_drive_url_mounts_my_drive_relay(tmp_path):
    mounter = FakeMounter(tmp_path)
    storage = open_colab_drive("drive", mounter=mounter, mount_point=tmp_path)
    assert mounter.calls == ["mount"]
    assert Path(storage.url) == tmp_path / "MyDrive" / "relay"


def test_colab_flush_unmounts_and_the_next_operation_remounts(tmp_path):
    mounter = FakeMounter(tmp_path)
    storage = open_colab_drive("drive", mounter=mounter, mount_point=tmp_path)
    storage.put(write(tmp_path, "f", b"x"), "run/a")
    storage.flush()
    assert mounter.calls == ["mount", "flush"]
    storage.put(write(tmp_path, "g", b"y"), "run/b")
    assert mounter.calls == ["mount", "flush", "mount"]


def test_colab_path_outside_the_mount_is_refused(tmp_path):
    with pytest.raises(UsageError):
        open_colab_drive(str(tmp_path / "elsewhere"), mounter=FakeMounter(tmp_path), mount_point=tmp_path / "m")


def test_colab_dropped_mount_is_a_transient_error_that_recommends_the_api(tmp_path, monkeypatch):
    storage = ColabDriveStorage(tmp_path / "MyDrive" / "r", mount_point=tmp_path, mounter=FakeMounter(tmp_path))

    def dropped(*args, **kwargs):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr("runner.storage.local.atomic_copy", dropped)
    monkeypatch.setattr(Path, "is_file", dropped)
    for operation in (lambda: storage.put(write(tmp_path, "f", b"x"), "k"), lambda: storage.exists("k")):
        with pytest.raises(StorageError) as info:
            operation()
        assert info.value.transient is True
        assert "mount dropped" in str(info.value) and "gdrive://" in info.value.hint


def test_colab_flush_failure_says_what_may_be_lost(tmp_path):
    class Failing(FakeMounter):
        def flush_and_unmount(self, timeout_ms: int) -> None:
            raise ValueError("drive exited with status 1")

    storage = open_colab_drive("drive", mounter=Failing(tmp_path), mount_point=tmp_path)
    with pytest.raises(StorageError, match="may not have reached Drive"):
        storage.flush()


def test_deleting_a_folders_last_file_removes_the_folder(fake, tmp_path):
    storage = drive_storage(fake)
    base = storage._base_id
    for name in ("lora.safetensors", "COMMIT.json"):
        storage.put(write(tmp_path, name, b"x"), f"run/checkpoints/step-1/{name}")
    storage.put(write(tmp_path, "keep", b"k"), "run/checkpoints/step-2/COMMIT.json")
    storage.delete("run/checkpoints/step-1/COMMIT.json")
    assert fake.find("run/checkpoints/step-1", root=base), "not empty yet"
    storage.delete("run/checkpoints/step-1/lora.safetensors")
    assert fake.find("run/checkpoints/step-1", root=base) == []
    assert [f.title for f in fake.find("run/checkpoints/step-2", root=base)] == ["step-2"]
    storage.put(write(tmp_path, "again", b"a"), "run/checkpoints/step-1/COMMIT.json")
    assert [f.content for f in fake.find("run/checkpoints/step-1/COMMIT.json", root=base)] == [b"a"]


def test_put_recovers_when_a_cached_folder_was_deleted_elsewhere(fake, tmp_path):
    clock = FakeClock()
    storage = drive_storage(fake, clock)
    storage.put(write(tmp_path, "a", b"a"), "run/logs/a")
    [logs] = fake.find("run/logs", root=storage._base_id)
    fake.files.pop(logs.id)  # another tool removed the folder (and, for Drive, what was in it)
    storage.put(write(tmp_path, "b", b"b"), "run/logs/b")
    assert [f.content for f in fake.find("run/logs/b", root=storage._base_id)] == [b"b"]


def fake_colab(monkeypatch, drive) -> None:
    colab = type(sys)("google.colab")
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)


def test_colab_mounter_uses_google_colab_drive(tmp_path, monkeypatch):
    calls = []
    drive = type(sys)("google.colab.drive")
    drive.mount = lambda point, force_remount: calls.append(("mount", force_remount)) or (tmp_path / "MyDrive").mkdir()
    drive.flush_and_unmount = lambda timeout_ms: calls.append(("flush", timeout_ms))
    fake_colab(monkeypatch, drive)
    storage = open_colab_drive("drive", mount_point=tmp_path)
    storage.flush()
    assert calls == [("mount", True), ("flush", 30 * 60 * 1000)]


def test_colab_mount_that_cannot_reach_the_notebook_says_what_to_do(tmp_path, monkeypatch):
    drive = type(sys)("google.colab.drive")

    def mount(point, force_remount):
        raise RuntimeError("no kernel to ask for consent")

    drive.mount = mount
    fake_colab(monkeypatch, drive)
    with pytest.raises(UsageError) as info:
        open_colab_drive("drive", mount_point=tmp_path)
    assert "drive.mount(" in info.value.hint and "gdrive://" in info.value.hint


@pytest.mark.parametrize(
    ("raised", "says"),
    [
        (AttributeError("'NoneType' object has no attribute 'kernel'"), "drive.mount("),  # a `!` child on Colab
        (NotImplementedError("Mounting drive is unsupported in this environment"), "not Colab"),  # Kaggle's image
    ],
)
def test_colab_mount_failures_of_the_real_module_are_bad_input_not_crashes(tmp_path, monkeypatch, raised, says):
    """colabtools' drive.mount raises AttributeError outside the notebook kernel (_message.py) and
    NotImplementedError without /var/colab/hostname (drive.py): both are a clear exit 2."""
    drive = type(sys)("google.colab.drive")

    def mount(point, force_remount):
        raise raised

    drive.mount = mount
    fake_colab(monkeypatch, drive)
    with pytest.raises(UsageError) as info:
        open_colab_drive("drive", mount_point=tmp_path)
    assert info.value.exit_code == 2 and says in str(info.value) + info.value.hint and "gdrive://" in info.value.hint


def test_drive_url_off_colab_explains_itself(tmp_path):
    with pytest.raises(UsageError, match="only on Colab"):
        open_colab_drive("drive", mount_point=tmp_path)


def test_checkpoint_commit_protocol_under_a_stale_listing(fake, tmp_path):
    """The checkpoint layer's commit (files, then COMMIT.json) and verified fetch, on Drive whose listing lags."""
    from runner.checkpoint.manifest import commit_folder, fetch_folder, write_manifest

    storage = drive_storage(fake)
    local = tmp_path / "staged"
    local.mkdir()
    (local / "lora.safetensors").write_bytes(b"w" * 5000)
    (local / "state.json").write_text('{"step": 1}')
    write_manifest(local, {"step": 1})
    fake.set_stale_listing(10_000)
    commit_folder(storage, local, "run/checkpoints/step-00000001")
    manifest = fetch_folder(storage, "run/checkpoints/step-00000001", tmp_path / "restored")
    assert sorted(manifest["files"]) == ["lora.safetensors", "state.json"]
    assert (tmp_path / "restored" / "lora.safetensors").read_bytes() == b"w" * 5000


@pytest.mark.parametrize("resumable", [False, True])
def test_fake_drive_accepts_multipart_and_chunked_resumable_uploads(fake, resumable):
    """The fake speaks the upload protocols googleapiclient uses (multipart; resumable in several chunks)."""
    import io

    from googleapiclient.http import MediaIoBaseUpload

    client = connect(parse_credentials(json.dumps(fake.add_account()), "test"), fake.endpoint)
    data = bytes(range(256)) * 2048  # 512 KiB: two 256 KiB chunks when resumable
    media = MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream", chunksize=256 * 1024, resumable=resumable)
    files = client.drive.auth.service.files()
    meta = files.insert(body={"title": "blob", "parents": [{"id": "root"}]}, media_body=media).execute()
    assert meta["fileSize"] == str(len(data)) and fake.files[meta["id"]].content == data
    assert files.get(fileId=meta["id"]).execute()["md5Checksum"] == meta["md5Checksum"]
