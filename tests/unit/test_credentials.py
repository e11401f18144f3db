"""Where Relay finds Drive credentials, what it says when they are missing or wrong, and that secrets stay secret."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from runner.errors import CredentialsError
from runner.storage.credentials import (
    AUTHORIZED_USER,
    CONFIG_FILE,
    ENV_CREDENTIALS,
    ENV_GOOGLE,
    SECRET_NAME,
    SERVICE_ACCOUNT,
    colab_secret,
    find_credentials,
    kaggle_secret,
    parse_credentials,
    temporary_credentials_file,
    write_credentials_file,
)

SECRET = "1//0gSUPER-SECRET-refresh-token-do-not-leak"


def user_info(refresh_token: str = SECRET, **extra: str) -> dict[str, str]:
    return {
        "type": "authorized_user",
        "client_id": "123.apps.googleusercontent.com",
        "client_secret": "GOCSPX-client-secret",
        "refresh_token": refresh_token,
        **extra,
    }


def service_info() -> dict[str, str]:
    return {"type": "service_account", "client_email": "bot@p.iam.gserviceaccount.com", "private_key": "-----KEY-----"}


def no_secrets(name: str) -> None:
    return None


NONE = (("Colab secret", no_secrets), ("Kaggle secret", no_secrets))


def file_with(folder: Path, name: str, info: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(info))
    return path


def test_env_var_holding_json(tmp_path):
    creds = find_credentials({ENV_CREDENTIALS: json.dumps(user_info())}, home=tmp_path, secret_lookups=NONE)
    assert creds.kind == AUTHORIZED_USER and creds.info["refresh_token"] == SECRET
    assert creds.source == f"env {ENV_CREDENTIALS}"


def test_env_var_holding_a_path(tmp_path):
    path = file_with(tmp_path, "c.json", service_info())
    creds = find_credentials({ENV_CREDENTIALS: str(path)}, home=tmp_path, secret_lookups=NONE)
    assert creds.kind == SERVICE_ACCOUNT and creds.is_service_account
    assert str(path) in creds.source and creds.account == "bot@p.iam.gserviceaccount.com"


def test_lookup_order(tmp_path):
    """path > RELAY_GDRIVE_CREDENTIALS > GOOGLE_APPLICATION_CREDENTIALS > Colab > Kaggle > config file."""
    asked: list[str] = []

    def secret(label: str, value: str | None):
        def lookup(name: str) -> str | None:
            asked.append(f"{label}:{name}")
            return value

        return (label, lookup)

    config = tmp_path / CONFIG_FILE
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(user_info("from-config")))
    google = file_with(tmp_path, "google.json", user_info("from-google-env"))
    explicit = file_with(tmp_path, "explicit.json", user_info("from-path"))
    colab = secret("Colab secret", json.dumps(user_info("from-colab")))
    kaggle = secret("Kaggle secret", json.dumps(user_info("from-kaggle")))
    env = {ENV_CREDENTIALS: json.dumps(user_info("from-relay-env")), ENV_GOOGLE: str(google)}

    def token(**kwargs) -> str:
        return find_credentials(home=tmp_path, **kwargs).info["refresh_token"]

    assert token(env=env, path=explicit, secret_lookups=(colab, kaggle)) == "from-path"
    assert token(env=env, secret_lookups=(colab, kaggle)) == "from-relay-env"
    assert token(env={ENV_GOOGLE: str(google)}, secret_lookups=(colab, kaggle)) == "from-google-env"
    assert asked == []
    assert token(env={}, secret_lookups=(colab, kaggle)) == "from-colab"
    assert asked == [f"Colab secret:{SECRET_NAME}"]
    assert token(env={}, secret_lookups=(secret("Colab secret", None), kaggle)) == "from-kaggle"
    assert token(env={}, secret_lookups=NONE) == "from-config"


def test_nothing_found_says_where_it_looked_and_what_to_provide(tmp_path):
    with pytest.raises(CredentialsError) as info:
        find_credentials({}, home=tmp_path, secret_lookups=NONE)
    message = str(info.value)
    for place in (
        ENV_CREDENTIALS,
        ENV_GOOGLE,
        f"Colab secret {SECRET_NAME}",
        f"Kaggle secret {SECRET_NAME}",
        str(tmp_path / CONFIG_FILE),
    ):
        assert place in message
    assert "refresh_token" in info.value.hint and "Shared Drive" in info.value.hint
    assert info.value.transient is False


def test_a_present_but_broken_source_is_an_error_not_skipped(tmp_path):
    config = tmp_path / CONFIG_FILE
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(user_info()))
    with pytest.raises(CredentialsError, match=ENV_CREDENTIALS):
        find_credentials({ENV_CREDENTIALS: "/no/such/file.json"}, home=tmp_path, secret_lookups=NONE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "authorized_user", "refresh_token": "' + SECRET + '"', "not valid JSON"),
        (json.dumps({"type": "authorized_user", "refresh_token": SECRET}), "lack client_id, client_secret"),
        (json.dumps({"type": "service_account", "private_key": SECRET}), "lack client_email"),
        (json.dumps({"installed": {"client_id": "x", "client_secret": SECRET}}), "no refresh token"),
        (json.dumps({"type": "external_account", "token": SECRET}), "unknown credential type"),
    ],
)
def test_invalid_credentials_are_named_without_their_secret(text, expected):
    with pytest.raises(CredentialsError) as info:
        parse_credentials(text, f"env {ENV_CREDENTIALS}")
    assert expected in str(info.value) and ENV_CREDENTIALS in str(info.value)
    assert SECRET not in str(info.value)


def test_secret_holding_broken_json_is_not_echoed(tmp_path, caplog):
    lookups = (("Colab secret", lambda name: "{" + SECRET), ("Kaggle secret", no_secrets))
    with pytest.raises(CredentialsError) as info:
        find_credentials({}, home=tmp_path, secret_lookups=lookups)
    assert f"Colab secret {SECRET_NAME}" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text


def test_repr_and_redact_hide_secrets():
    creds = parse_credentials(json.dumps(user_info()), "test")
    assert SECRET not in repr(creds) and "GOCSPX" not in repr(creds)
    assert creds.redact(f"refresh failed for {SECRET} / GOCSPX-client-secret") == "refresh failed for *** / ***"


def test_notebook_secret_lookups_are_absent_off_colab_and_kaggle():
    assert colab_secret(SECRET_NAME) is None
    assert kaggle_secret(SECRET_NAME) is None


def test_written_credential_file_is_0600_and_never_overwritten(tmp_path):
    path = write_credentials_file(user_info(), tmp_path / "c.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["refresh_token"] == SECRET
    with pytest.raises(FileExistsError):
        write_credentials_file(user_info(), path)


def test_temporary_credential_file_is_private_and_removed(tmp_path):
    creds = parse_credentials(json.dumps(user_info()), "test")
    with temporary_credentials_file(creds) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert parse_credentials(path.read_text(), "copy").info == creds.info
    assert not path.exists() and not path.parent.exists()


def test_pydrive2_saved_credentials_file_is_accepted(tmp_path):
    saved = {
        "access_token": "ya29.old-access-token",
        "client_id": "123.apps.googleusercontent.com",
        "client_secret": "GOCSPX-client-secret",
        "refresh_token": SECRET,
        "token_expiry": "2026-01-01T00:00:00Z",
        "token_uri": "https://oauth2.googleapis.com/token",
        "invalid": False,
        "_module": "oauth2client.client",
        "_class": "OAuth2Credentials",
    }
    creds = find_credentials({ENV_CREDENTIALS: str(file_with(tmp_path, "saved.json", saved))}, secret_lookups=NONE)
    assert creds.kind == AUTHORIZED_USER
    assert "ya29.old-access-token" in creds.secrets() and SECRET in creds.secrets()


def test_colab_secret_reads_userdata_and_treats_a_missing_secret_as_absent(monkeypatch):
    class SecretNotFoundError(Exception):
        pass

    userdata = type(sys)("google.colab.userdata")
    userdata.SecretNotFoundError = SecretNotFoundError
    store = {SECRET_NAME: "{...}"}

    def get(name):
        if name not in store:
            raise SecretNotFoundError(name)
        return store[name]

    userdata.get = get
    colab = type(sys)("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    assert colab_secret(SECRET_NAME) == "{...}"
    assert colab_secret("OTHER") is None


def test_kaggle_secret_with_internet_off_is_absent(monkeypatch):
    class BackendError(Exception):
        pass

    class UserSecretsClient:
        def get_secret(self, name):
            raise BackendError("Unexpected response from the service: internet is off")

    module = type(sys)("kaggle_secrets")
    module.BackendError, module.UserSecretsClient = BackendError, UserSecretsClient
    monkeypatch.setitem(sys.modules, "kaggle_secrets", module)
    assert kaggle_secret(SECRET_NAME) is None
