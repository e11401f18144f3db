"""Colab sign-in (colabtools google/colab/auth.py, authenticate_user's non-ephemeral path).

What the real one does and the stand-in keeps: if valid user application-default credentials (ADC)
exist, return; else set os.environ['GOOGLE_APPLICATION_CREDENTIALS'] to `_get_adc_path()`
($DATALAB_ROOT/content/.adc/adc.json, DATALAB_ROOT defaulting to '/'), sign in through the frontend
(`gcloud auth login --enable-gdrive-access`: the token carries Drive access), and write the gcloud
credential (an `authorized_user` JSON: client_id, client_secret, refresh_token) to that path
(`_install_adc`). The variable is set in the kernel's own environment only, so processes the kernel
starts afterwards inherit it. With USE_AUTH_EPHEM=1 the real one instead asks the frontend for
ephemeral credentials served by the VM's metadata server (no file); `google.auth.default()` finds
either. The sign-in needs the kernel: from a `!` child it raises AttributeError here (the real
one's prompt reads the kernel's stdin).
"""

import json as _json
import os as _os

from google.colab import _message
from google.colab import errors as _errors

__all__ = ["authenticate_user"]

FAKE_ADC = {
    "type": "authorized_user",
    "client_id": "32555940559.apps.googleusercontent.com",  # gcloud's public OAuth client id
    "client_secret": "standin-client-secret",
    "refresh_token": "standin-refresh-token",
}


def _get_adc_path():
    dir_path = _os.path.join(_os.environ.get("DATALAB_ROOT", "/"), "content/.adc/")
    _os.makedirs(dir_path, exist_ok=True)
    return _os.path.join(dir_path, "adc.json")


def _check_adc():
    path = _os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path or not _os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return _json.load(f).get("type") == "authorized_user"


def authenticate_user(clear_output=True, project_id=None):
    _message.record("auth.authenticate_user")
    if _check_adc():
        return
    _os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = _get_adc_path()
    _message.blocking_request("request_auth", request={"authType": "auth_user"}, timeout_sec=None)
    with open(_get_adc_path(), "w", encoding="utf-8") as f:
        f.write(_json.dumps(FAKE_ADC))
    if not _check_adc():
        raise _errors.AuthorizationError("Failed to fetch user credentials")
