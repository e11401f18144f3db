"""Google Drive credentials: where Relay looks for them, what it accepts, how it keeps them secret.

Owns: finding one credential JSON (an explicit path, the RELAY_GDRIVE_CREDENTIALS and
GOOGLE_APPLICATION_CREDENTIALS environment variables, a Colab or Kaggle notebook secret, a
file in the user's config folder), telling OAuth user credentials (authorized_user, with a
refresh token) from service-account keys, redacting secret values from any text, and writing
a credential file with mode 0600 when one must exist on disk.

Must not: log, repr or put into an error message any secret value (refresh token, client
secret, private key, access token); import google.colab or kaggle_secrets at module level;
read os.environ itself (the caller passes the environment); talk to Google.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import CredentialsError

log = logging.getLogger(__name__)

ENV_CREDENTIALS = "RELAY_GDRIVE_CREDENTIALS"
"""A path to a credential JSON file, or the JSON itself."""
ENV_GOOGLE = "GOOGLE_APPLICATION_CREDENTIALS"
"""Google's conventional variable: a path to a credential JSON file."""
SECRET_NAME = "RELAY_GDRIVE_CREDENTIALS"
"""The name of the Colab / Kaggle notebook secret holding the credential JSON."""
CONFIG_FILE = Path(".config") / "relay" / "gdrive-credentials.json"
"""Relative to the home directory."""

AUTHORIZED_USER = "authorized_user"
SERVICE_ACCOUNT = "service_account"
APPLICATION_DEFAULT = "application_default"
APPLICATION_DEFAULT_VALUE = "application-default"
"""RELAY_GDRIVE_CREDENTIALS value meaning "use Google's application-default credentials" (ADC): what
Colab's `auth.authenticate_user()` installs, with Drive access (colabtools google/colab/auth.py: the
gcloud login runs with --enable-gdrive-access; the credential lands in $DATALAB_ROOT/content/.adc/adc.json,
named by GOOGLE_APPLICATION_CREDENTIALS in the kernel's environment, or, with USE_AUTH_EPHEM=1, is
served by the VM's metadata server). runner.notebook sets it after signing in; google.auth.default()
finds either form, in any process of the VM."""
_SECRET_FIELDS = ("refresh_token", "client_secret", "private_key", "private_key_id", "access_token", "token")
_USER_FIELDS = ("client_id", "client_secret", "refresh_token")
_SERVICE_FIELDS = ("client_email", "private_key")
_HINT = (
    "give Relay OAuth user credentials (an authorized_user JSON with client_id, client_secret and "
    f"refresh_token) as a file path or the JSON itself in {ENV_CREDENTIALS}, or as a Colab/Kaggle secret "
    f"named {SECRET_NAME}; see docs/storage.md ('Credentials'). A service-account key works only with a Shared Drive."
)

SecretLookup = Callable[[str], "str | None"]
"""Returns a notebook secret's value, or None where that kind of secret does not exist here."""


@dataclass(frozen=True)
class DriveCredentials:
    """One parsed credential. `repr` and `str` show the kind and where it came from, never values."""

    kind: str
    """AUTHORIZED_USER or SERVICE_ACCOUNT."""
    source: str
    """Where it was found, for messages: e.g. 'env RELAY_GDRIVE_CREDENTIALS (file /x.json)'."""
    info: Mapping[str, str] = field(repr=False)
    """The JSON fields, secrets included: pass to the Google client only."""

    @property
    def is_service_account(self) -> bool:
        return self.kind == SERVICE_ACCOUNT

    @property
    def is_application_default(self) -> bool:
        return self.kind == APPLICATION_DEFAULT

    @property
    def account(self) -> str:
        """The service account's e-mail (not secret: users share folders with it), or 'OAuth user'."""
        return self.info.get("client_email", "?") if self.is_service_account else "OAuth user"

    def secrets(self) -> tuple[str, ...]:
        return tuple(str(self.info[k]) for k in _SECRET_FIELDS if self.info.get(k))

    def redact(self, text: str) -> str:
        """`text` with every secret value of this credential replaced by '***'."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text


def parse_credentials(text: str, source: str) -> DriveCredentials:
    """Parse credential JSON; errors name `source` and what is missing, never a value."""
    try:
        info = json.loads(text)
    except ValueError:
        raise CredentialsError(f"{source}: not valid JSON", hint=_HINT) from None
    if not isinstance(info, dict):
        raise CredentialsError(f"{source}: expected a JSON object", hint=_HINT)
    kind = info.get("type") or (AUTHORIZED_USER if "refresh_token" in info else "")
    if kind == SERVICE_ACCOUNT:
        required = _SERVICE_FIELDS
    elif kind == AUTHORIZED_USER:
        required = _USER_FIELDS
    elif "installed" in info or "web" in info:
        raise CredentialsError(
            f"{source}: this is an OAuth client configuration (client_secrets.json), not user credentials: "
            "it has no refresh token",
            hint="run the one-time authorisation in docs/storage.md to turn it into authorized_user credentials",
        )
    else:
        raise CredentialsError(f"{source}: unknown credential type {str(kind)[:40]!r}", hint=_HINT)
    missing = [k for k in required if not info.get(k)]
    if missing:
        raise CredentialsError(f"{source}: {kind} credentials lack {', '.join(missing)}", hint=_HINT)
    return DriveCredentials(kind=kind, source=source, info={k: v for k, v in info.items() if isinstance(v, str)})


def _read_file(path: Path, source: str) -> DriveCredentials:
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise CredentialsError(f"{source}: cannot read {path}: {err.strerror}", hint=_HINT) from None
    return parse_credentials(text, f"{source} (file {path})")


def _from_value(value: str, source: str) -> DriveCredentials:
    """A variable or secret holds the JSON itself, a path to it, or APPLICATION_DEFAULT_VALUE."""
    if value.strip() == APPLICATION_DEFAULT_VALUE:
        return DriveCredentials(APPLICATION_DEFAULT, f"{source} (Google application-default credentials)", {})
    if value.lstrip().startswith("{"):
        return parse_credentials(value, source)
    if "\n" in value or len(value) > 4096:
        raise CredentialsError(f"{source}: neither JSON nor a file path", hint=_HINT)
    return _read_file(Path(value), source)


def colab_secret(name: str, on_denied: Callable[[str], None] | None = None) -> str | None:
    """A Colab notebook secret (google.colab.userdata), or None when not on Colab or not granted;
    `on_denied(name)` is told when the secret exists but the user denied this notebook access to it."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    names = ("SecretNotFoundError", "NotebookAccessError", "TimeoutException")
    # google.colab also imports on Kaggle (its image is Colab's, docs/platforms.md) and in `!` child processes,
    # where userdata cannot reach the notebook: AttributeError (no kernel) or TimeoutException (no answer)
    expected = tuple(getattr(userdata, n) for n in names if hasattr(userdata, n)) + (LookupError, AttributeError)
    try:
        return userdata.get(name)
    except expected as exc:
        if on_denied is not None and type(exc).__name__ == "NotebookAccessError":
            on_denied(name)
        return None


def kaggle_secret(name: str) -> str | None:
    """A Kaggle notebook secret, or None when not on Kaggle, missing, or the notebook's internet is off."""
    try:
        import kaggle_secrets  # type: ignore[import-not-found]
    except ImportError:
        return None
    names = ("BackendError", "CredentialError", "ValidationError")
    expected = tuple(getattr(kaggle_secrets, n) for n in names if hasattr(kaggle_secrets, n)) + (OSError,)
    try:
        return kaggle_secrets.UserSecretsClient().get_secret(name)
    except expected:
        log.info("Kaggle secret %s not available (is the notebook's internet on?)", name)
        return None


DEFAULT_SECRET_LOOKUPS: tuple[tuple[str, SecretLookup], ...] = (
    ("Colab secret", colab_secret),
    ("Kaggle secret", kaggle_secret),
)


def find_credentials(
    env: Mapping[str, str],
    *,
    path: Path | None = None,
    home: Path | None = None,
    secret_lookups: Sequence[tuple[str, SecretLookup]] = DEFAULT_SECRET_LOOKUPS,
) -> DriveCredentials:
    """The first credential found, in this order: `path`, env RELAY_GDRIVE_CREDENTIALS, env
    GOOGLE_APPLICATION_CREDENTIALS, each notebook secret named RELAY_GDRIVE_CREDENTIALS, then
    HOME/.config/relay/gdrive-credentials.json. A source that is present but invalid is an
    error (not skipped), so a typo never silently picks up other credentials."""
    if path is not None:
        return _read_file(path, "given path")
    looked: list[str] = []
    for name in (ENV_CREDENTIALS, ENV_GOOGLE):
        value = env.get(name, "").strip()
        if value:
            source = f"env {name}"
            return _from_value(value, source) if name == ENV_CREDENTIALS else _read_file(Path(value), source)
        looked.append(f"env {name} (unset)")
    for label, lookup in secret_lookups:
        value = (lookup(SECRET_NAME) or "").strip()
        if value:
            return _from_value(value, f"{label} {SECRET_NAME}")
        looked.append(f"{label} {SECRET_NAME} (not set, or not on that platform)")
    home = home if home is not None else Path(env.get("HOME") or Path.home())
    config = home / CONFIG_FILE
    if config.is_file():
        return _read_file(config, "config file")
    looked.append(f"{config} (missing)")
    raise CredentialsError("no Google Drive credentials found; looked in: " + "; ".join(looked), hint=_HINT)


class ApplicationDefault:
    """Google's application-default credentials (google.auth.default) in the shape the Drive backend and
    pydrive2 use of oauth2client credentials: access_token, access_token_expired, refresh(http), authorize(http).
    Colab's own PyDrive2 hook does the same with the metadata server's credentials
    (colabtools google/colab/_import_hooks/_pydrive2.py)."""

    def __init__(self, credentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"ApplicationDefault({type(self._credentials).__name__})"

    @property
    def access_token(self) -> str | None:
        return self._credentials.token

    @property
    def access_token_expired(self) -> bool:
        return not self._credentials.valid

    def refresh(self, http) -> None:
        import google_auth_httplib2

        self._credentials.refresh(google_auth_httplib2.Request(http))

    def authorize(self, http):
        import google_auth_httplib2

        return google_auth_httplib2.AuthorizedHttp(self._credentials, http=http)


def load_application_default(scope: str, default: Callable | None = None) -> ApplicationDefault:
    """The VM's application-default credentials with `scope`; CredentialsError (no secret in it) if none."""
    if default is None:
        import google.auth

        default = google.auth.default
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _project = default(scopes=[scope])
    except DefaultCredentialsError:
        raise CredentialsError(
            f"{ENV_CREDENTIALS}={APPLICATION_DEFAULT_VALUE}, but this machine has no Google application-default "
            "credentials",
            hint="on Colab, run the notebook cell (it signs you in); elsewhere use OAuth user credentials: " + _HINT,
        ) from None
    return ApplicationDefault(credentials)


def write_credentials_file(info: Mapping[str, str], path: Path) -> Path:
    """Write credential JSON to a new file created with mode 0600 (never wider, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(dict(info), out)
    return path


@contextlib.contextmanager
def temporary_credentials_file(credentials: DriveCredentials) -> Iterator[Path]:
    """A 0600 copy of `credentials` in a private (0700) temp dir, removed on exit.

    For tools that insist on a path. The Drive backend itself never needs one: it builds its
    credentials in memory.
    """
    folder = Path(tempfile.mkdtemp(prefix="relay-cred-"))
    try:
        yield write_credentials_file(credentials.info, folder / "credentials.json")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
