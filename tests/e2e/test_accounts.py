"""One run carried across two Google accounts through one shared Drive folder (issue 5).

The fake Drive server (tests/fakedrive.py) speaks Drive v2 to the real pydrive2 client. Each account has
its own HOME and credential file (make_fake_account); the fake does not scope files per account, which is
what a folder shared with a collaborator looks like to both of them. Alice trains part of the run and is
stopped by SIGTERM; her credentials are then revoked and her HOME deleted, and Bob, on a fresh workdir,
finishes the run. Its LoRA must equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner import events
from runner.errors import EXIT_OK, EXIT_PREEMPTED
from tests.e2e.test_resume import FINAL_LORA, RUN, assert_same_lora, reference_storage, run_session
from tests.fakedrive import FOLDER_MIME, FakeDrive, make_fake_account


@pytest.fixture
def drive():
    with FakeDrive() as server:
        yield server


def use_account(monkeypatch, server: FakeDrive, home: Path) -> None:
    """Make this process look like a notebook signed in as the account whose HOME is `home`."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for name, value in make_fake_account(server, home).items():
        monkeypatch.setenv(name, value)


def revoke(server: FakeDrive, home: Path) -> None:
    """The account's refresh token stops working and its machine is gone."""
    with server.lock:
        for token, name in list(server.refresh_tokens.items()):
            if name == home.name:
                del server.refresh_tokens[token]
    shutil.rmtree(home)


def stored_file(server: FakeDrive, folder_id: str, key: str, dest: Path) -> Path:
    found = server.find(key, root=folder_id)
    assert len(found) == 1, f"{key}: {len(found)} files in the fake Drive"
    dest.write_bytes(found[0].content)
    return dest


@pytest.mark.slow
@pytest.mark.exact_resume
def test_second_account_finishes_the_run_exactly(drive, tmp_path, tmp_path_factory, monkeypatch):
    reference = reference_storage(tmp_path_factory)
    shared = drive.add_folder("root", "relay-shared")
    url = f"gdrive://{shared}"

    alice = tmp_path / "alice"
    use_account(monkeypatch, drive, alice)
    first = run_session(url, alice / "work", stop_after=2)
    assert first.code == EXIT_PREEMPTED
    assert drive.find(f"{RUN}/checkpoints/step-00000002/COMMIT.json", root=shared)
    revoke(drive, alice)

    bob = tmp_path / "bob"
    use_account(monkeypatch, drive, bob)
    second = run_session(url, bob / "fresh-vm")
    assert second.code == EXIT_OK, second.warnings()
    assert [e.step for e in second.of(events.StepDone)] == [3, 4, 5], "Bob continues from Alice's step 2"
    assert not second.of(events.CacheProgress), "Bob downloads the cache Alice built"
    final = stored_file(drive, shared, f"{RUN}/{FINAL_LORA}", tmp_path / "final.safetensors")
    assert_same_lora(final, reference / RUN / FINAL_LORA)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_a_cut_off_upload_and_a_duplicate_folder_title_do_not_break_resume(drive, tmp_path, monkeypatch):
    """Alice's session dies while uploading step 3: a step-00000003 folder without COMMIT.json stays behind.
    Bob must ignore it, and committing his own step 3 creates a second folder of that title (Drive allows it)."""
    shared = drive.add_folder("root", "relay-shared")
    url = f"gdrive://{shared}"
    use_account(monkeypatch, drive, tmp_path / "alice")
    assert run_session(url, tmp_path / "alice" / "work", stop_after=2).code == EXIT_PREEMPTED
    (checkpoints,) = drive.find(f"{RUN}/checkpoints", root=shared)
    torn = drive.add_folder(checkpoints.id, "step-00000003")
    drive.add_file(torn, "lora.safetensors", b"half an upload")

    use_account(monkeypatch, drive, tmp_path / "bob")
    second = run_session(url, tmp_path / "bob" / "work", stop_after=3)
    assert second.code == EXIT_PREEMPTED, second.warnings()
    assert [e.step for e in second.of(events.StepDone)] == [3]
    assert any("unfinished" in w and "3" in w for w in second.warnings()), second.warnings()
    folders = [f for f in drive.find(f"{RUN}/checkpoints/step-00000003", root=shared) if f.mime_type == FOLDER_MIME]
    assert folders, "step 3 was committed"

    third = run_session(url, tmp_path / "carol-vm", stop_after=4)
    assert third.code == EXIT_PREEMPTED, third.warnings()
    assert [e.step for e in third.of(events.StepDone)] == [4], "the committed step 3 is found despite the twin"
