"""Zero-setup Drive on Colab: after the kernel's sign-in, the trainer reaches Drive with Google's
application-default credentials (RELAY_GDRIVE_CREDENTIALS=application-default), through pydrive2,
against the local fake Drive API (its token endpoint included)."""

from __future__ import annotations

import json
import os

import pytest

from runner.errors import CredentialsError
from runner.storage.credentials import APPLICATION_DEFAULT, find_credentials, load_application_default
from runner.storage.gdrive import DriveStorage
from runner.storage.gdriveclient import DRIVE_SCOPE, connect
from tests.fakedrive import FakeDrive

NO_SECRETS: tuple = ()


def test_the_signed_in_adc_file_reaches_drive(tmp_path, monkeypatch):
    with FakeDrive() as fake:
        adc = tmp_path / "content" / ".adc" / "adc.json"  # colabtools auth._get_adc_path() under DATALAB_ROOT
        adc.parent.mkdir(parents=True)
        adc.write_text(json.dumps(fake.add_account("colab-user")))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
        import google.auth

        real_default = google.auth.default

        def default_against_fake(scopes):  # google-auth pins Google's token URI for authorized_user files
            credentials, project = real_default(scopes=scopes)
            return credentials.with_token_uri(f"{fake.endpoint}/token"), project

        monkeypatch.setattr(google.auth, "default", default_against_fake)
        env = {"RELAY_GDRIVE_CREDENTIALS": "application-default", "GOOGLE_APPLICATION_CREDENTIALS": str(adc)}
        credentials = find_credentials(env, secret_lookups=NO_SECRETS)
        assert credentials.kind == APPLICATION_DEFAULT and "application-default" in credentials.source
        assert credentials.secrets() == ()
        base = fake.add_folder("root", "relay")
        storage = DriveStorage(connect(credentials, fake.endpoint), url=f"gdrive://{base}", base_id=base)
        (tmp_path / "a.bin").write_bytes(b"hello")
        storage.put(tmp_path / "a.bin", "run/a.bin")
        storage.get("run/a.bin", tmp_path / "b.bin")
        assert (tmp_path / "b.bin").read_bytes() == b"hello"
        assert storage.list("run") == ["run/a.bin"]


def test_without_application_default_credentials_the_error_says_what_to_do(tmp_path, monkeypatch):
    from google.auth.exceptions import DefaultCredentialsError

    def none(scopes):
        raise DefaultCredentialsError("no ADC")

    with pytest.raises(CredentialsError, match="no Google application-default credentials") as err:
        load_application_default(DRIVE_SCOPE, default=none)
    assert "notebook cell" in str(err.value)


def test_the_stand_in_sign_in_writes_adc_where_colab_does_and_needs_the_kernel(tmp_path):
    """tests/platforms/colab follows colabtools auth.py: GOOGLE_APPLICATION_CREDENTIALS is set to
    $DATALAB_ROOT/content/.adc/adc.json before the sign-in, which needs the kernel (AttributeError here)."""
    import subprocess
    import sys
    from pathlib import Path

    standin = Path(__file__).parents[1] / "platforms" / "colab"
    code = (
        "import os\nfrom google.colab import auth\ntry:\n    auth.authenticate_user()\n"
        "except AttributeError as e:\n    print('raised', e)\nprint(os.environ['GOOGLE_APPLICATION_CREDENTIALS'])"
    )
    env = {**os.environ, "PYTHONPATH": f"{standin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DATALAB_ROOT": str(tmp_path)}  # fmt: skip
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "raised 'NoneType' object has no attribute 'kernel'" in out
    assert out.strip().endswith(str(tmp_path / "content" / ".adc" / "adc.json"))
