"""How the Hub backend makes its calls and commits: retries, error mapping, spacing, no duplicates.

Owns: `HubCalls`, the calls of runner.storage.hub on one repo: each runs under the shared retry
policy (runner.storage.retry) with the client's failures mapped to StorageError (a refused token to
HubAccessError, exit 2; the rest by runner.storage.hubhttp). A commit takes a slot of a token bucket
(`HubLimits`: a burst, then one commit per spacing, below the Hub's 128 commits per hour per repo),
and its title carries a unique operation id: when a commit's answer is lost (connection dropped,
5xx) the server may have applied it, so before trying again the branch's commits are read and, if
the id is there, the commit is taken as done. It never retries blindly into a duplicate
(huggingface_hub's own `_send_commit` warns of exactly that). A 412 (the branch moved past the
commit's `parent_commit`) becomes CommitConflict for runner.storage.hubfence to decide on. It also
super-squashes the history once enough commits piled up.

Must not: know keys, folders or the lease; print, log or store the token (messages pass through
`_redact`); import huggingface_hub at module level.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runner.clock import Clock
from runner.errors import EXIT_USAGE, CredentialsError, RelayError, StorageError
from runner.storage import hubhttp
from runner.storage.hubhttp import TOKENS_PAGE
from runner.storage.hubhttp import error_code_of as _error_code
from runner.storage.hubhttp import status_of as _status
from runner.storage.hubwire import HubWire
from runner.storage.retry import RetryPolicy, call_with_retry, time_left_s

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_TOKEN = "HF_TOKEN"


@dataclass(frozen=True)
class HubLimits:
    """How the backend stays inside the Hub's limits (docs/storage.md shows the arithmetic)."""

    commits_per_hour: float = 100.0
    """Sustained commit rate, below the Hub's 128 commits per hour per repo."""
    commit_burst: int = 20
    """Commits allowed back to back before the spacing applies (a session's start writes a few files)."""
    squash_every_commits: int = 100
    """Super-squash the branch after a delete once this many commits piled up since the last squash."""

    @property
    def commit_spacing_s(self) -> float:
        """Minimum average spacing of commits, in seconds (36 s at 100 per hour)."""
        return 3600.0 / self.commits_per_hour


class HubAccessError(CredentialsError):
    """The token cannot do what the run needs (read-only, no rights on the repo, a repo of another type). Exit 2."""

    exit_code = EXIT_USAGE


class CommitConflict(StorageError):
    """The branch moved since the revision a compare-and-swap was based on (HTTP 412)."""


class HubCalls:
    """The calls and commits of one repo (`url` names it in messages). Thread-safe."""

    def __init__(
        self,
        api: Any,
        wire: HubWire,
        *,
        repo_id: str,
        url: str,
        clock: Clock,
        retry: RetryPolicy,
        limits: HubLimits,
    ) -> None:
        self._api = api
        self._wire = wire
        self.repo_id = repo_id
        self.url = url
        self._clock = clock
        self._retry = retry
        self.limits = limits
        self._lock = threading.Lock()
        self._tokens = float(self.limits.commit_burst)  # the commit bucket
        self._refilled_at = self._clock.monotonic()
        self.commits_since_squash = 0

    def run(self, what: str, key: str, operation: Callable[[], T]) -> T:
        """One operation under the shared retry policy, the client's errors translated."""
        return call_with_retry(
            lambda: self._translated(what, key, operation), policy=self._retry, clock=self._clock, on_retry=_log_retry
        )

    def commit(
        self,
        what: str,
        key: str,
        operations: Callable[[Any], list],
        *,
        parent: str | None = None,
        missing_ok: bool = False,
    ) -> str:
        """One create_commit under the retry policy, titled with a unique id; an attempt after a lost answer
        first looks for that id among the branch's commits. Returns the commit id ("" when `missing_ok` and
        there was nothing to delete); CommitConflict when `parent` is no longer the head."""
        op_id = uuid.uuid4().hex[:16]
        title = f"relay: {what} [{op_id}]"
        tries = {"n": 0}

        def attempt() -> str:
            tries["n"] += 1
            if tries["n"] > 1:
                landed = self._wire.find_commit(f"[{op_id}]")
                if landed is not None:
                    log.info("%s: commit %s had landed before its answer was lost", self.url, op_id)
                    return landed
            self._take_commit_slot()
            return self._create_commit(title, operations, parent, missing_ok)

        commit_id = self.run(what, key, attempt)
        with self._lock:
            self.commits_since_squash += 1
        return commit_id

    def maybe_squash(self) -> bool:
        """Super-squash the branch if `squash_every_commits` commits piled up (old checkpoints' files leave the
        history, so the repo's storage stops growing). True if it squashed."""
        if self.commits_since_squash < self.limits.squash_every_commits:
            return False
        self.run(
            "squash history",
            "",
            lambda: self._api.super_squash_history(self.repo_id, commit_message="relay: squash history"),
        )
        self.commits_since_squash = 0
        log.info("squashed the history of %s", self.repo_id)
        return True

    def _create_commit(
        self, title: str, operations: Callable[[Any], list], parent: str | None, missing_ok: bool
    ) -> str:
        from huggingface_hub.utils import HfHubHTTPError

        try:
            info = self._api.create_commit(
                self.repo_id, operations=operations(_Ops), commit_message=title, parent_commit=parent
            )
        except HfHubHTTPError as err:
            if _status(err) == 412:
                raise CommitConflict(f"{self.url}: another commit landed first", transient=False) from None
            if missing_ok and _error_code(err) == "EntryNotFound":
                return ""
            raise
        return info.oid

    def _take_commit_slot(self) -> None:
        """A token bucket: `commit_burst` commits at once, then one per `commit_spacing_s`."""
        with self._lock:
            now = self._clock.monotonic()
            rate = 1.0 / self.limits.commit_spacing_s
            self._tokens = min(self.limits.commit_burst, self._tokens + (now - self._refilled_at) * rate)
            self._refilled_at = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / rate
            left = time_left_s(self._clock)
            if left is not None and wait > left:  # the heartbeat: never wait for a slot past its deadline
                raise StorageError(
                    f"{self.url}: the next commit slot comes in {wait:.0f} s, after the deadline", transient=True
                )
            self._tokens -= 1
        if wait > 0:
            log.info("spacing commits to %s: waiting %.0f s (Hub limit: 128 commits per hour)", self.repo_id, wait)
            self._clock.sleep(wait)

    def _translated(self, what: str, key: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except RelayError:
            raise
        except Exception as err:  # huggingface_hub's failures (HTTP, transport, LFS RuntimeError, bad JSON)
            where = f"{self.url}/{key}" if key else self.url
            if _status(err) in (401, 403):
                raise HubAccessError(
                    f"could not {what} {where}: the Hub refused the token (HTTP {_status(err)})",
                    key=key,
                    hint=f"check that {ENV_TOKEN} is a token with write access to {self.repo_id} ({TOKENS_PAGE})",
                ) from None
            translated = hubhttp.translate(err, what, where, key, self._redact)
            if translated is None:
                raise
            raise translated from None

    def _redact(self, text: str) -> str:
        token = getattr(self._api, "token", None)
        return text.replace(token, "hf_***") if isinstance(token, str) and token else text


class _Ops:
    """The commit operations, built lazily so huggingface_hub is imported only here."""

    @staticmethod
    def Add(path: str, source: Path | bytes) -> Any:  # noqa: N802 - mirrors CommitOperationAdd
        from huggingface_hub import CommitOperationAdd

        return CommitOperationAdd(
            path_in_repo=path, path_or_fileobj=source if isinstance(source, bytes) else str(source)
        )

    @staticmethod
    def Delete(path: str, *, is_folder: bool = False) -> Any:  # noqa: N802 - mirrors CommitOperationDelete
        from huggingface_hub import CommitOperationDelete

        return CommitOperationDelete(path_in_repo=path, is_folder=is_folder)


def _log_retry(error: BaseException, attempt: int, wait_s: float) -> None:
    log.warning("%s; try %d in %.1f s", getattr(error, "message", error), attempt, wait_s)
