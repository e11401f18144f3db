"""The Drive backend under faults: bursts survived with backoff, permanent errors at once, secrets kept out."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.clock import FakeClock
from runner.errors import CredentialsError, StorageError
from runner.storage.credentials import DriveCredentials, parse_credentials
from runner.storage.gdrive import DriveStorage, RetryPolicy, connect
from tests.fakedrive import FakeDrive

# oauth2client signs service-account JWTs through a pyOpenSSL call that warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:sign\\(\\) is deprecated:DeprecationWarning")

POLICY = RetryPolicy(attempts=5, initial_s=1.0, max_s=60.0, jitter_s=1.0)


@pytest.fixture
def fake():
    with FakeDrive() as server:
        yield server


def open_with(fake: FakeDrive, credentials: DriveCredentials, clock: FakeClock) -> DriveStorage:
    folder = fake.add_folder("root", "relay")
    client = connect(credentials, fake.endpoint)
    return DriveStorage(client, url=f"gdrive://{folder}", base_id=folder, clock=clock, retry=POLICY)


def user_credentials(fake: FakeDrive) -> DriveCredentials:
    return parse_credentials(json.dumps(fake.add_account()), "test credentials")


def service_account_credentials(fake: FakeDrive) -> DriveCredentials:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    info = {
        "type": "service_account",
        "client_email": "relay-bot@example-project.iam.gserviceaccount.com",
        "client_id": "1234",
        "private_key_id": "abcdef0123456789",
        "private_key": pem.decode(),
        "token_uri": f"{fake.endpoint}/token",
    }
    return parse_credentials(json.dumps(info), "test service account")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def storage(fake, clock):
    return open_with(fake, user_credentials(fake), clock)


def payload(tmp_path: Path, data: bytes = b"checkpoint bytes" * 100) -> Path:
    path = tmp_path / "payload"
    path.write_bytes(data)
    return path


def assert_backoff(sleeps: list[float], count: int) -> None:
    """`count` waits, each at least initial·2^n and at most that plus the jitter."""
    assert len(sleeps) == count
    for n, wait in enumerate(sleeps):
        assert POLICY.initial_s * 2**n <= wait <= POLICY.initial_s * 2**n + POLICY.jitter_s


@pytest.mark.parametrize(
    ("status", "reason", "html"),
    [
        (429, "rateLimitExceeded", False),
        (403, "userRateLimitExceeded", False),
        (503, "backendError", False),
        (502, "", True),
    ],
)
def test_bursts_are_survived_with_exponential_backoff(fake, storage, clock, tmp_path, status, reason, html):
    storage.exists("warm-up")  # opens the root folder and fetches a token
    fake.fail_next(3, status, reason, html=html)
    storage.put(payload(tmp_path), "run/COMMIT.json")
    assert_backoff(clock.sleeps, 3)
    [stored] = fake.find("run/COMMIT.json", root=storage._base_id)
    assert stored.content == payload(tmp_path).read_bytes()


def test_download_survives_a_burst(fake, storage, clock, tmp_path):
    storage.put(payload(tmp_path, b"abc"), "run/x")
    fake.fail_next(2, 500, "internalError")
    storage.get("run/x", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"abc"
    assert len(clock.sleeps) == 2


def test_a_burst_longer_than_the_policy_gives_up_transiently(fake, storage, clock, tmp_path):
    storage.exists("warm-up")
    fake.fail_next(50, 429, "rateLimitExceeded")
    with pytest.raises(StorageError) as info:
        storage.put(payload(tmp_path), "run/a")
    assert info.value.transient is True
    assert "429" in str(info.value)
    assert len(clock.sleeps) == POLICY.attempts - 1


def test_connection_dropped_mid_upload_is_retried(fake, storage, clock, tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.exists("warm-up")
    fake.drop_next_uploads(3)  # httplib2 itself resends once; Relay's retries cover the rest
    storage.put(payload(tmp_path, data), "run/lora.safetensors")
    assert fake.dropped_uploads == 3
    assert clock.sleeps, "at least one drop reached Relay's retry"
    [stored] = fake.find("run/lora.safetensors", root=storage._base_id)
    assert stored.content == data


def test_upload_that_arrives_altered_is_sent_again(fake, storage, clock, tmp_path):
    storage.exists("warm-up")
    fake.corrupt_next_uploads(1)
    storage.put(payload(tmp_path, b"exact"), "run/state.json")
    assert len(clock.sleeps) == 1
    [stored] = fake.find("run/state.json", root=storage._base_id)
    assert stored.content == b"exact" and stored.md5_override is None


def test_upload_that_keeps_arriving_altered_fails(fake, storage, clock, tmp_path):
    storage.exists("warm-up")
    fake.corrupt_next_uploads(100)
    with pytest.raises(StorageError, match="md5"):
        storage.put(payload(tmp_path), "run/state.json")
    assert len(fake.find("run/state.json", root=storage._base_id)) == 1, "retries updated one file, no duplicates"


def test_service_account_quota_fails_at_once_and_explains_shared_drives(fake, clock, tmp_path):
    credentials = service_account_credentials(fake)
    storage = open_with(fake, credentials, clock)
    fake.set_quota_exceeded()
    with pytest.raises(StorageError) as info:
        storage.put(payload(tmp_path), "run/run.json")
    assert clock.sleeps == []
    assert info.value.transient is False
    assert "storageQuotaExceeded" in str(info.value)
    assert "Shared Drive" in info.value.hint and "relay-bot@example-project" in info.value.hint
    assert "OAuth" in info.value.hint


def test_user_quota_says_the_drive_is_full(fake, storage, clock, tmp_path):
    fake.set_quota_exceeded()
    with pytest.raises(StorageError) as info:
        storage.put(payload(tmp_path), "run/run.json")
    assert clock.sleeps == [] and "full" in info.value.hint


def test_revoked_refresh_token_is_a_credentials_error_without_the_secret(fake, clock, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    credentials = user_credentials(fake)
    fake.refresh_tokens.clear()  # revoked
    storage = open_with(fake, credentials, clock)
    with pytest.raises(CredentialsError) as info:
        storage.put(payload(tmp_path), "run/a")
    assert clock.sleeps == []
    assert "test credentials" in str(info.value) and "refresh token" in info.value.hint
    for secret in credentials.secrets():
        assert secret not in str(info.value) and secret not in caplog.text


def test_secrets_stay_out_of_logs_and_errors_during_a_faulty_run(fake, clock, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    credentials = user_credentials(fake)
    storage = open_with(fake, credentials, clock)
    fake.fail_next(2, 503, "backendError")
    storage.put(payload(tmp_path), "run/a")
    fake.fail_next(1, 400, "badRequest")
    with pytest.raises(StorageError) as info:
        storage.get("run/a", tmp_path / "out")
    shown = caplog.text + str(info.value) + repr(storage) + storage.url + repr(credentials)
    assert "backendError" in caplog.text  # the retries were logged…
    for secret in credentials.secrets() + tuple(fake.access_tokens):
        assert secret not in shown  # …without a secret


def test_service_account_works_through_the_jwt_token_flow(fake, clock, tmp_path):
    storage = open_with(fake, service_account_credentials(fake), clock)
    storage.put(payload(tmp_path, b"sa"), "run/a")
    assert storage.exists("run/a")


def test_an_expired_token_is_refreshed_never_an_interactive_login(fake, storage, tmp_path, monkeypatch):
    def no_prompt(*args):
        raise AssertionError("Relay must never ask for an interactive login")

    monkeypatch.setattr("builtins.input", no_prompt)
    monkeypatch.setattr("webbrowser.open", no_prompt)
    storage.put(payload(tmp_path), "run/a")
    credentials = storage._drive.auth.credentials
    credentials.token_expiry = datetime.datetime(2000, 1, 1)  # an hour later, in effect
    assert storage.exists("run/a")
    assert len(fake.access_tokens) == 2


def test_delete_without_permission_falls_back_to_trash(fake, storage, clock, tmp_path):
    storage.put(payload(tmp_path), "run/old.bin")
    storage.put(payload(tmp_path), "run/keep.bin")  # so the folder stays
    [stored] = fake.find("run/old.bin", root=storage._base_id)
    fake.fail_next(1, 403, "insufficientFilePermissions", method="DELETE")
    storage.delete("run/old.bin")
    assert fake.files[stored.id].trashed
    assert not storage.exists("run/old.bin") and clock.sleeps == []


def test_a_drive_client_failure_is_not_blamed_on_the_local_disk(fake):
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    from runner.storage.gdriveclient import translate

    creds, url = user_credentials(fake), "gdrive://My Drive/relay"
    client = translate(DefaultCredentialsError("No project ID"), what="upload", key="k", url=url, credentials=creds)
    assert "local path" not in client.hint and "relay doctor --storage gdrive://My Drive/relay" in client.hint
    refused = translate(RefreshError("invalid_grant"), what="upload", key="k", url=url, credentials=creds)
    assert isinstance(refused, CredentialsError) and "refresh token" in refused.hint
    disk = translate(OSError(28, "No space left on device"), what="download", key="k", url=url, credentials=creds)
    assert "free disk space" in disk.hint
