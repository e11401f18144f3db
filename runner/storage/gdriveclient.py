"""The Google Drive API client under runner.storage.gdrive: connecting, token refresh, errors, retries.

Owns: `connect` (a pydrive2 GoogleDrive on Drive API v2, authorised with OAuth, service-account or
Colab sign-in credentials; the test server differs only in the API root), `DriveCalls` (one Drive
operation with the access token refreshed first, the client's errors translated, and retries under
the shared policy in runner.storage.retry), and `translate`: a client-library error as a
StorageError that is transient (429, rate-limit 403s, 5xx, a dropped connection) or permanent with
what to do (a refused credential, a full account, a missing folder).

Why apart from the backend: what Drive's answers mean and how a call is authorised and retried is
one concern; how '/'-keys map onto folders and files (runner.storage.gdrive) is another, and that
module talks to Drive only through the calls made here.

Must not: import pydrive2 or the Google client libraries at module level; log or raise anything
that contains a credential (messages pass through DriveCredentials.redact); know '/'-keys or folders.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from runner.clock import Clock
from runner.errors import CredentialsError, RelayError, StorageError
from runner.storage.credentials import DriveCredentials, load_application_default
from runner.storage.retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)
T = TypeVar("T")

DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
HTTP_TIMEOUT_S = 120  # one request; a hung connection becomes a retried error
RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "backendError", "internalError"})
_NET_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ENETDOWN, errno.EPIPE})


@dataclass
class DriveClient:
    """A connected pydrive2 GoogleDrive plus what DriveStorage needs beside it."""

    drive: Any
    """pydrive2.drive.GoogleDrive."""
    credentials: DriveCredentials
    api_errors: tuple[type[BaseException], ...]
    """Exception types the client libraries raise, translated into StorageError."""
    token_http: Any
    """An unauthorised httplib2.Http for token refreshes."""


def connect(credentials: DriveCredentials, endpoint: str | None = None) -> DriveClient:
    """A GoogleDrive authorised with `credentials`, talking to `endpoint` (default: Google).

    The service is built from googleapiclient's bundled Drive v2 discovery document, so no
    discovery request is made; only its rootUrl changes for a test server. The production and
    the test path share everything else, token refresh included.
    """
    import httplib2
    from googleapiclient.discovery import build_from_document
    from googleapiclient.discovery_cache import get_static_doc
    from googleapiclient.errors import Error as ApiClientError
    from oauth2client.client import Error as OAuthError
    from pydrive2.auth import AuthError, GoogleAuth
    from pydrive2.drive import GoogleDrive
    from pydrive2.files import ApiRequestError

    auth = GoogleAuth(settings_file=None, http_timeout=HTTP_TIMEOUT_S)
    if credentials.is_application_default:  # Colab's sign-in (runner/storage/credentials.py)
        from google.auth.exceptions import GoogleAuthError

        auth.credentials = load_application_default(DRIVE_SCOPE)
        api_errors: tuple = (GoogleAuthError,)
    else:
        auth.credentials = _oauth2client_credentials(credentials)
        api_errors = ()
    auth.auth_method = "service" if credentials.is_service_account else "oauth"
    if not credentials.is_service_account and not credentials.is_application_default:
        # If pydrive2 ever finds the token expired before we refresh it, it calls LocalWebserverAuth,
        # whose decorator refreshes with the refresh token when a full client config is present and
        # would otherwise look for client_secrets.json. Give it one, so it never prompts.
        auth.client_config = {
            "client_id": credentials.info["client_id"],
            "client_secret": credentials.info["client_secret"],
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": auth.credentials.token_uri,
            "revoke_uri": None,
            "redirect_uri": "urn:ietf:wg:oauth:2.0:oob",
        }
    auth.http = auth.credentials.authorize(auth._build_http())
    document = json.loads(get_static_doc("drive", "v2"))
    if endpoint:
        document["rootUrl"] = endpoint.rstrip("/") + "/"
        document["baseUrl"] = document["rootUrl"] + document["servicePath"]
    auth.service = build_from_document(document, http=auth.http)
    errors = (ApiRequestError, ApiClientError, OAuthError, AuthError, httplib2.HttpLib2Error, OSError, ValueError,
              *api_errors)  # fmt: skip
    return DriveClient(GoogleDrive(auth), credentials, errors, token_http=auth._build_http())


def _oauth2client_credentials(credentials: DriveCredentials) -> Any:
    import oauth2client
    from oauth2client.client import OAuth2Credentials
    from oauth2client.service_account import ServiceAccountCredentials

    info = dict(credentials.info)
    if credentials.is_service_account:
        return ServiceAccountCredentials.from_json_keyfile_dict(info, scopes=[DRIVE_SCOPE])
    return OAuth2Credentials(
        access_token=None,  # fetched with the refresh token on first use
        client_id=info["client_id"],
        client_secret=info["client_secret"],
        refresh_token=info["refresh_token"],
        token_expiry=None,
        token_uri=info.get("token_uri") or oauth2client.GOOGLE_TOKEN_URI,
        user_agent="relay",
    )


def http_details(error: BaseException) -> tuple[int | None, str, str]:
    """(HTTP status, first error reason, message) of a client-library error, or (None, '', '') for a
    network failure. Looks through the exception chain: pydrive2 wraps HttpError in ApiRequestError,
    and raises a bare JSONDecodeError (HttpError as its context) when Drive answers with HTML."""
    seen: BaseException | None = error
    while seen is not None:
        detail = getattr(seen, "error", None)
        if isinstance(detail, dict) and detail.get("code"):
            first = (detail.get("errors") or [{}])[0]
            return int(detail["code"]), first.get("reason", ""), detail.get("message", "")
        resp = getattr(seen, "resp", None)
        if resp is not None and getattr(resp, "status", None):
            return int(resp.status), _reason_of(getattr(seen, "content", b"")), ""
        status = getattr(seen, "status", None)  # oauth2client's HttpAccessTokenRefreshError
        if isinstance(status, int):
            return status, "token", str(seen)
        seen = seen.__cause__ or seen.__context__
    return None, "", ""


def _reason_of(content: bytes | str) -> str:
    try:
        body = json.loads(content)
        return body["error"]["errors"][0]["reason"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def translate(error: BaseException, *, what: str, key: str, url: str, credentials: DriveCredentials) -> StorageError:
    """A client-library error as a StorageError: transient (retried) or permanent with a fix."""
    status, reason, message = http_details(error)
    where = f"Drive {what} of {key!r} in {url}"
    detail = credentials.redact(f"{status} {reason}: {message}".strip(": ")) if status else type(error).__name__
    refused = reason == "token" or status == 401 or _is_refresh_error(error)
    if status is None and not _is_network(error) and not refused:
        detail = credentials.redact(f"{type(error).__name__}: {error}")
        local = isinstance(error, OSError)  # a file on this machine (staging, cache); anything else is Drive's client
        hint = "check the local path and free disk space" if local else (
            f"check the Drive credentials and the folder: relay doctor --storage {url} (docs/storage.md)")  # fmt: skip
        return StorageError(f"{where} failed ({detail})", key=key, hint=hint)
    if not refused and (status is None or status == 429 or status >= 500 or (status == 403 and reason in RATE_REASONS)):
        return StorageError(f"{where} failed ({detail})", key=key, transient=True)
    if refused:
        return CredentialsError(
            f"{where}: Google refused the {credentials.kind} credentials from {credentials.source} ({detail})",
            key=key,
            hint="make a new refresh token (docs/storage.md, 'Credentials'); tokens of an OAuth app left in "
            "'Testing' expire after 7 days, so publish the app 'In production'",
        )
    if status == 403 and reason == "storageQuotaExceeded":
        return StorageError(f"{where}: Drive storage quota exceeded ({detail})", key=key, hint=_quota_hint(credentials))
    if status == 404:
        return StorageError(f"{where}: not found ({detail})", key=key, hint="check that the folder still exists")
    return StorageError(f"{where} failed ({detail})", key=key, hint="check the folder's sharing and the account")


def _is_network(error: BaseException) -> bool:
    """A failure of the connection (reset, timeout, DNS, TLS, cut-off response), not of a local file."""
    import httplib2

    network = (ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError, socket.gaierror)
    return isinstance(error, network + (httplib2.HttpLib2Error,)) or getattr(error, "errno", None) in _NET_ERRNOS


def _is_refresh_error(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    return bool(names & {"AccessTokenRefreshError", "HttpAccessTokenRefreshError", "RefreshError"})


def _quota_hint(credentials: DriveCredentials) -> str:
    if credentials.is_service_account:
        return (
            f"{credentials.account} is a service account: service accounts have no storage of their own and "
            "cannot own files in a personal My Drive. Use a folder in a Shared Drive (Google Workspace) that "
            "is shared with it, or use OAuth user credentials with a refresh token (docs/storage.md)"
        )
    return "the Drive account is full: free space (empty the trash too) or point --storage at another account"


class DriveCalls:
    """Drive operations of one storage: each refreshes the access token first, has the client's errors
    translated (naming `url`) and is retried under the shared policy (runner.storage.retry)."""

    def __init__(
        self, client: DriveClient, *, url: str, clock: Clock, retry: RetryPolicy, lock: threading.RLock
    ) -> None:
        self._client = client
        self._url = url
        self._clock = clock
        self._retry = retry
        self._lock = lock  # the storage's: a token refresh waits while another thread creates a folder

    def run(self, what: str, key: str, operation: Callable[[], T]) -> T:
        """One Drive operation under the shared retry policy (runner.storage.retry)."""
        return call_with_retry(
            lambda: self._attempt(what, key, operation),
            policy=self._retry,
            clock=self._clock,
            on_retry=self._log_retry,
        )

    def _attempt(self, what: str, key: str, operation: Callable[[], T]) -> T:
        try:
            self._ensure_token()
            return operation()
        except RelayError:
            raise
        except self._client.api_errors as err:
            raise translate(err, what=what, key=key, url=self._url, credentials=self._client.credentials) from None

    def _ensure_token(self) -> None:
        """Refresh an expired access token ourselves: pydrive2 would start an interactive login."""
        auth = self._client.drive.auth
        with self._lock:
            if auth.credentials.access_token is None or auth.credentials.access_token_expired:
                auth.credentials.refresh(self._client.token_http)

    def _log_retry(self, error: BaseException, attempt: int, wait_s: float) -> None:
        log.warning(
            "%s; try %d of %d in %.1f s", getattr(error, "message", error), attempt, self._retry.attempts, wait_s
        )
