"""How the Hub backend speaks HTTP: deadlines on every request, and the client's failures as StorageError.

Owns: the timeouts of huggingface_hub's shared HTTP client (its default client waits forever:
utils/_http.py default_client_factory passes timeout=None, so a commit whose answer never comes
would stall a session), reading how long a server asked us to wait (Retry-After, and the IETF
RateLimit header the Hub sends, parsed by huggingface_hub's parse_ratelimit_headers), and turning
every failure the client raises into a StorageError that names the status and what to do:
HfHubHTTPError, a transport error or timeout, the RuntimeError of a failed LFS/Xet upload, and the
JSONDecodeError of an HTML error page where the client expected JSON.

Must not: retry (runner.storage.retry does), or let the token into a message (`redact` is applied).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from runner.errors import StorageError

CONNECT_TIMEOUT_S = 30.0
"""Seconds to open a connection to the Hub."""
READ_TIMEOUT_S = 120.0
"""Seconds a request may wait for the next bytes of an answer (or to send the next bytes of a body)."""
ENV_TIMEOUT_S = "RELAY_HUB_TIMEOUT_S"
"""Tests: the read timeout in seconds instead of READ_TIMEOUT_S (a hung request then ends in a second)."""
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


def timeout(read_s: float = READ_TIMEOUT_S) -> Any:
    """The httpx timeout of every Hub request: connect, read, write and pool, each bounded."""
    import httpx2

    return httpx2.Timeout(connect=min(CONNECT_TIMEOUT_S, read_s), read=read_s, write=read_s, pool=read_s)


def bound_client(read_s: float = READ_TIMEOUT_S) -> None:
    """Give huggingface_hub's shared client a deadline on every request (create_commit, preupload, LFS,
    repo info pass none of their own). Done through the client's own hook, set_client_factory; the shared
    client is replaced only when its timeout differs, so open requests of other threads are left alone."""
    from huggingface_hub.utils import get_session, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    wanted = timeout(read_s)
    if get_session().timeout == wanted:
        return

    def factory() -> Any:
        client = default_client_factory()
        client.timeout = wanted
        return client

    set_client_factory(factory)


def status_of(err: Any) -> int:
    response = getattr(err, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def error_code_of(err: Any) -> str:
    response = getattr(err, "response", None)
    return (getattr(response, "headers", None) or {}).get("X-Error-Code", "")


def wait_asked_s(headers: Any) -> float | None:
    """How long the server asked us to wait: the longer of Retry-After (seconds) and, when no request is
    left in the window, the RateLimit header's reset time. None when it said nothing."""
    from huggingface_hub.utils import parse_ratelimit_headers

    headers = headers or {}
    waits = []
    after = str(headers.get("Retry-After", "") or "").strip()
    if after.isdigit():
        waits.append(float(after))
    limit = parse_ratelimit_headers(headers)
    if limit is not None and limit.remaining == 0:
        waits.append(float(limit.reset_in_seconds))
    return max(waits) if waits else None


def translate(err: BaseException, what: str, where: str, key: str, redact: Callable[[str], str]) -> StorageError | None:
    """The StorageError for a failure of huggingface_hub or its transport; None for one it does not know
    (which then stays an unexpected error). HTTP 401/403 are left to the caller (an access error)."""
    import httpx2
    from huggingface_hub.utils import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return _http_error(err, what, where, key, redact)
    if isinstance(err, httpx2.TimeoutException):
        return StorageError(f"could not {what} {where}: the Hub did not answer in time ({type(err).__name__})",
                            key=key, transient=True)  # fmt: skip
    if isinstance(err, (httpx2.TransportError, OSError)):
        return StorageError(redact(f"could not {what} {where}: {type(err).__name__}: {err}"), key=key, transient=True)
    if isinstance(err, json.JSONDecodeError):  # an HTML error page (a 502 from a proxy) where JSON was due
        return StorageError(f"could not {what} {where}: the Hub answered with a page that is not JSON "
                            "(a proxy error, most often)", key=key, transient=True,
                            hint="try again in a few minutes; https://status.huggingface.co shows outages")  # fmt: skip
    if isinstance(err, RuntimeError):  # an LFS/Xet upload failed: _commit_api.py _upload_lfs_files wraps the cause
        first = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        cause = err.__cause__ if isinstance(err.__cause__, Exception) else None
        why = translate(cause, what, where, key, redact) if cause is not None else None
        return StorageError(f"could not {what} {where}: the file upload failed: {first}"
                            + (f" ({why.message.rsplit(': ', 1)[-1]})" if why else ""),
                            key=key, transient=why.transient if why else True,
                            hint="check the network and the repo's storage quota; the last committed "
                            "checkpoint is intact, run the same command again")  # fmt: skip
    return None


def _http_error(err: Any, what: str, where: str, key: str, redact: Callable[[str], str]) -> StorageError:
    status = status_of(err)
    server_says = ""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    server_says = str(getattr(err, "server_message", "") or headers.get("X-Error-Message", "") or "").strip()
    detail = redact(server_says.splitlines()[0] if server_says else "")
    transient = status in (408, 429) or status >= 500
    hint = ""
    if status == 429:
        hint = ("the Hub limits requests and commits per hour; Relay waits as the Hub asks and counts its own "
                "commits (docs/storage.md)")  # fmt: skip
    elif status >= 500:
        hint = "the Hub has trouble; https://status.huggingface.co shows outages"
    error = StorageError(f"could not {what} {where}: HTTP {status}" + (f" ({detail})" if detail else ""),
                         key=key, transient=transient, hint=hint)  # fmt: skip
    wait = wait_asked_s(headers)
    if wait is not None:
        from runner.storage.retry import RETRY_AFTER_ATTR

        setattr(error, RETRY_AFTER_ATTR, wait)
    return error
