"""The Hugging Face Hub backend (`hf://USER/REPO[/PREFIX]`): a private model repo as a run store.

Owns: `HubStorage` (put/get/list/delete/exists over huggingface_hub's HfApi, each write one
commit), what the Hub allows beyond the contract (`commit_folder`: a checkpoint's files and its
COMMIT.json in ONE atomic commit; `delete_folder`: one commit; `update_if_unchanged`: a
compare-and-swap on the branch head through create_commit's `parent_commit`), opening the repo
(token check, private repo created on first use), staying inside the Hub's rate limits, and
keeping the repo's history bounded (super-squash).

Ambiguous failures: when a commit's answer is lost (connection dropped, 5xx), the server may
have applied it. Every commit's title carries a unique operation id; before trying again the
backend reads the branch's commits and, if its id is there, takes the commit as done. It never
retries blindly into a duplicate (huggingface_hub's own `_send_commit` warns of exactly that).

Fencing (`fence`): while a session holds the run's lease, every commit but the lease's own is
conditional (`parent_commit`) on a head at which lease.json was ours; a 412 makes the backend read
the real head from the commit listing and check the lease there again: still ours, it commits on
that head; taken, the check raises LeaseLost and nothing is written.

Retries: one policy (runner.storage.retry) per operation: 429 (waiting at least the server's
Retry-After or RateLimit reset), 5xx, dropped connections and requests that time out (runner.storage.hubhttp
gives every request a deadline). Reads (listings, the commit list, downloads) go
through runner.storage.hubwire as plain HTTP, since the client's own read calls retry inside.

Must not: print, log or store the token (messages pass through `_redact`); import torch; be
imported unless an hf:// URL is used (huggingface_hub loads lazily here).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from runner.clock import Clock, SystemClock
from runner.errors import EXIT_USAGE, CredentialsError, RelayError, StorageError, UsageError
from runner.storage import hubhttp
from runner.storage.hubhttp import error_code_of as _error_code
from runner.storage.hubhttp import status_of as _status
from runner.storage.hubwire import HubWire
from runner.storage.retry import RetryPolicy, call_with_retry, time_left_s

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEME = "hf://"
ENV_TOKEN = "HF_TOKEN"
ENV_ENDPOINT = "HF_ENDPOINT"
"""The Hub to talk to (huggingface_hub's own variable); tests point it at the stand-in on 127.0.0.1."""
ENV_COMMITS_PER_HOUR = "RELAY_HUB_COMMITS_PER_HOUR"
"""Test/advanced: the sustained commit rate instead of HubLimits' 100 (a stand-in Hub has no limit)."""
DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
OTHER_REPO_TYPES = ("dataset", "space")
CAS_TRIES = 8  # compare-and-swap rounds before giving up (each lost round means another commit landed)
CAS_PAUSE_S = 0.5  # first pause between two compare-and-swap rounds, doubled each round, jittered ×0.5..1.5
Fence = Callable[[bytes | None], None]
"""Given lease.json's content at a head, raises unless the lease there is still ours."""


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


def parse_hf_url(url: str) -> tuple[str, str]:
    """`hf://USER/REPO[/PREFIX]` → ("USER/REPO", "PREFIX" or "")."""
    if not url.startswith(SCHEME):
        raise UsageError(f"not a Hugging Face URL: {url!r}", hint="use hf://USER/REPO")
    rest = url[len(SCHEME) :]
    if "?" in rest or "#" in rest or "@" in rest:
        raise UsageError(
            f"hf:// URLs take no parameters or revisions: {url!r}",
            hint="pass the token through the HF_TOKEN environment variable or a notebook secret, never in the URL",
        )
    parts = [p for p in rest.split("/") if p]
    if parts and parts[0] in ("datasets", "spaces", "models"):
        raise UsageError(
            f"{url!r}: Relay stores runs in a model repo; write hf://USER/REPO without {parts[0]}/",
            hint="a dataset or Space repo cannot hold a run; pick a model repo name",
        )
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise UsageError(f"{url!r} names no repo", hint="use hf://USER/REPO or hf://USER/REPO/FOLDER")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def open_hub(
    url: str,
    *,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    retry: RetryPolicy | None = None,
    limits: HubLimits | None = None,
    private: bool = True,
) -> HubStorage:
    """Open the repo of `url` with the token in HF_TOKEN, creating a model repo (private unless told) on first use."""
    env = os.environ if env is None else env
    repo_id, prefix = parse_hf_url(url)
    api = _api_for(env, url)
    if limits is None and env.get(ENV_COMMITS_PER_HOUR):
        limits = HubLimits(commits_per_hour=_positive(env[ENV_COMMITS_PER_HOUR], ENV_COMMITS_PER_HOUR))
    read_s = hubhttp.READ_TIMEOUT_S
    if env.get(hubhttp.ENV_TIMEOUT_S):
        read_s = _positive(env[hubhttp.ENV_TIMEOUT_S], hubhttp.ENV_TIMEOUT_S)
    hubhttp.bound_client(read_s)
    storage = HubStorage(
        api, repo_id=repo_id, prefix=prefix, url=url, clock=clock, retry=retry, limits=limits, timeout_s=read_s
    )
    storage.ensure_repo(private=private)
    return storage


def token_user(env: Mapping[str, str] | None = None, *, clock: Clock | None = None) -> str:
    """The account name of the token in HF_TOKEN (one whoami call)."""
    env = os.environ if env is None else env
    probe = HubStorage(_api_for(env, "the Hugging Face Hub"), repo_id="", url="the Hugging Face Hub", clock=clock)
    return str(probe.account().get("name", ""))


def _api_for(env: Mapping[str, str], where: str) -> Any:
    """An HfApi with the token from HF_TOKEN and the endpoint from HF_ENDPOINT (passed explicitly: huggingface_hub
    reads HF_ENDPOINT once, at import)."""
    token = (env.get(ENV_TOKEN) or "").strip()
    if not token:
        raise HubAccessError(
            f"{where}: no Hugging Face token: set {ENV_TOKEN}",
            hint=f"create a token with write access at {TOKENS_PAGE}; on Colab or Kaggle add it as the secret "
            f"{ENV_TOKEN} (the notebook passes it in), elsewhere export {ENV_TOKEN}=…",
        )
    from huggingface_hub import HfApi

    endpoint = (env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")
    return HfApi(endpoint=endpoint, token=token, library_name="relay")


class HubStorage:
    """Storage in one model repo (under an optional folder). Thread-safe: uploads run in a background thread."""

    def __init__(
        self,
        api: Any,
        *,
        repo_id: str,
        prefix: str = "",
        url: str = "",
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
        limits: HubLimits | None = None,
        timeout_s: float = hubhttp.READ_TIMEOUT_S,
    ) -> None:
        self._api = api
        self._wire = HubWire(api, repo_id, timeout=hubhttp.timeout(timeout_s))
        self.repo_id = repo_id
        self.prefix = prefix.strip("/")
        self.url = url or f"{SCHEME}{repo_id}" + (f"/{self.prefix}" if self.prefix else "")
        self._clock = clock or SystemClock()
        self._retry = retry or RetryPolicy()
        self.limits = limits or HubLimits()
        self._lock = threading.Lock()
        self._tokens = float(self.limits.commit_burst)  # the commit bucket
        self._refilled_at = self._clock.monotonic()
        self.commits_since_squash = 0
        self._fence: tuple[str, Fence] | None = None  # (lease path, check) while a session holds the lease
        self._fence_head: str | None = None  # a head at which the lease was ours: the parent of the next commit
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"HubStorage({self.url!r})"

    # ---- opening -------------------------------------------------------------------------------
    def ensure_repo(self, *, private: bool = True) -> None:
        """Check the token and the repo; create a model repo if there is none. Exit-2 errors say what to do."""
        account = self.account()
        access = (account.get("auth") or {}).get("accessToken") or {}
        user = account.get("name", "?")
        if access.get("role") == "read":
            raise HubAccessError(
                f"{self.url}: the token of {user} is read-only; Relay commits checkpoints to the repo",
                hint=f"create a token with the 'write' role at {TOKENS_PAGE} and set it as {ENV_TOKEN}",
            )
        if self._exists_as("model"):
            return
        for other in OTHER_REPO_TYPES:
            if self._exists_as(other):
                raise HubAccessError(
                    f"{self.url}: {self.repo_id} is a {other} repo; Relay stores runs in a model repo",
                    hint="choose another name in --storage hf://USER/REPO (a new private model repo is created)",
                )
        self._call("create the repo", "", lambda: self._create_repo(private))
        log.info("created %s model repo %s", "private" if private else "public", self.repo_id)

    def account(self) -> dict:
        """whoami-v2 for the token: name, organisations, the token's role. Rate-limited on the Hub: called once."""
        return self._call("check the token", "", lambda: self._api.whoami())

    def _exists_as(self, repo_type: str) -> bool:
        from huggingface_hub.utils import RepositoryNotFoundError

        def look() -> bool:
            try:
                self._api.repo_info(self.repo_id, repo_type=repo_type)
                return True
            except RepositoryNotFoundError:
                return False

        return self._call("open the repo", "", look)

    def _create_repo(self, private: bool) -> None:
        from huggingface_hub.utils import HfHubHTTPError

        try:
            self._api.create_repo(self.repo_id, private=private, repo_type="model")
        except HfHubHTTPError as err:
            status = _status(err)
            if status == 409:  # created meanwhile by another session
                return
            if status in (401, 403):
                raise HubAccessError(
                    f"{self.url}: the repo does not exist and this token may not create {self.repo_id}",
                    hint=f"create the model repo at https://huggingface.co/new (private), or use hf://YOUR_NAME/REPO, "
                    f"or a token with write access to {self.repo_id.split('/')[0]} ({TOKENS_PAGE})",
                ) from None
            raise

    # ---- the Storage protocol ------------------------------------------------------------------
    def put(self, local_file: Path, key: str) -> None:
        path = self._path(key)
        if not Path(local_file).is_file():
            raise StorageError(f"cannot read {local_file} to upload it as {key!r}", key=key)
        self._commit(f"put {key}", key, lambda ops: [ops.Add(path, Path(local_file))])

    def get(self, key: str, local_file: Path) -> None:
        path = self._path(key)
        self._call("download", key, lambda: self._download(path, key, Path(local_file)))

    def list(self, prefix: str) -> list[str]:
        clean = prefix.strip("/")
        if clean:
            self._path(clean)
        found = self._call("list", clean or "/", lambda: self._wire.list_files(self._join(clean)))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(path[strip:] for path in found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not self.exists(key):
            return
        self._commit(f"delete {key}", key, lambda ops: [ops.Delete(path)], missing_ok=True)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._call("check", key, lambda: self._wire.exists(path))

    # ---- beyond the contract: atomic folders and compare-and-swap ------------------------------
    def commit_folder(self, local_dir: Path, key_prefix: str, names: list[str]) -> None:
        """Upload local_dir/NAME for every name (COMMIT.json among them) as ONE commit under `key_prefix`."""
        base = key_prefix.strip("/")
        keys = [f"{base}/{name}" if base else name for name in names]
        files = [(self._path(key), Path(local_dir) / name) for key, name in zip(keys, names, strict=True)]
        self._commit(f"commit {base or '/'}", base, lambda ops: [ops.Add(path, src) for path, src in files])

    def delete_folder(self, key_prefix: str) -> None:
        """Remove everything under `key_prefix` in one commit; then squash the history when it is due."""
        base = key_prefix.strip("/")
        path = self._path(base)
        if not self.list(base):
            return
        self._commit(f"delete {base}/", base, lambda ops: [ops.Delete(path + "/", is_folder=True)], missing_ok=True)
        self.maybe_squash()

    def update_if_unchanged(self, key: str, decide: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap on `key`: read it at the branch head H, write decide(content) (None: delete) in a
        commit whose parent must be H. If another commit landed meanwhile (412), read again and decide again.
        `decide` may raise to refuse (e.g. LeaseHeld); returns what was written."""
        path = self._path(key)
        for round_ in range(CAS_TRIES):
            self._pause(round_)
            head, current = self._call("read", key, lambda: self._read_at_head(path, key))
            new = decide(current)
            make = _update_operations(path, new)
            if new is None and current is None:
                return None
            try:
                self._commit(f"update {key}", key, make, parent=head)
                return new
            except CommitConflict:
                log.info("%s/%s changed while updating it; reading it again", self.url, key)
        raise StorageError(f"{self.url}/{key}: could not update it: the repo kept changing", key=key, transient=True)

    def fence(self, lease_key: str, check: Fence | None) -> None:
        """From now on (until fence(key, None)) every commit without a parent of its own is conditional on a
        head at which `check(content of lease_key)` passes; `check` raises (LeaseLost) to refuse."""
        if check is None:
            with self._lock:
                self._fence, self._fence_head = None, None
            return
        with self._lock:
            self._fence, self._fence_head = (self._path(lease_key), check), None
        try:
            self._confirm_fence(lease_key)
        except StorageError as exc:  # the next commit confirms it first; nothing goes unfenced meanwhile
            log.info("%s: the fence's head is not known yet (%s)", self.url, exc)

    def _confirm_fence(self, key: str, fence: tuple[str, Fence] | None = None) -> None:
        """Read the real head and the lease there; the fence's check raises when it is not ours."""
        fence = fence or self._fence
        if fence is None:
            return
        path, check = fence
        head, current = self._call("read", key, lambda: self._read_at_head(path, key))
        check(current)
        with self._lock:
            self._fence_head = head

    def _pause(self, round_: int) -> None:
        """Backoff with jitter between compare-and-swap rounds (none before the first)."""
        if round_:
            self._clock.sleep(CAS_PAUSE_S * 2 ** (round_ - 1) * self._random.uniform(0.5, 1.5))

    def maybe_squash(self) -> bool:
        """Super-squash the branch if `squash_every_commits` commits piled up (old checkpoints' files leave the
        history, so the repo's storage stops growing). True if it squashed."""
        if self.commits_since_squash < self.limits.squash_every_commits:
            return False
        self._call(
            "squash history",
            "",
            lambda: self._api.super_squash_history(self.repo_id, commit_message="relay: squash history"),
        )
        self.commits_since_squash = 0
        log.info("squashed the history of %s", self.repo_id)
        return True

    # ---- commits -------------------------------------------------------------------------------
    def _commit(
        self,
        what: str,
        key: str,
        operations: Callable[[Any], list],
        *,
        parent: str | None = None,
        missing_ok: bool = False,
    ) -> str:
        """One commit; while fenced and given no parent, conditional on a head where the lease is ours."""
        fence = self._fence
        if parent is not None or fence is None:
            return self._commit_once(what, key, operations, parent=parent, missing_ok=missing_ok)
        for round_ in range(CAS_TRIES):
            self._pause(round_)
            if self._fence_head is None:
                self._confirm_fence(key, fence)
            try:
                return self._commit_once(what, key, operations, parent=self._fence_head, missing_ok=missing_ok)
            except CommitConflict:
                log.info("%s: the branch moved before %s; checking the lease at the new head", self.url, what)
                self._confirm_fence(key, fence)
        raise StorageError(f"could not {what} {self.url}/{key}: the repo kept changing", key=key, transient=True)

    def _commit_once(
        self,
        what: str,
        key: str,
        operations: Callable[[Any], list],
        *,
        parent: str | None = None,
        missing_ok: bool = False,
    ) -> str:
        """One create_commit under the retry policy, titled with a unique id; an attempt after a lost answer
        first looks for that id among the branch's commits. Returns the commit id."""
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

        commit_id = self._call(what, key, attempt)
        with self._lock:
            self.commits_since_squash += 1
            if self._fence is not None and commit_id:
                self._fence_head = commit_id  # our own commit: the lease there is what it was at its parent
        return commit_id

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

    # ---- reads ---------------------------------------------------------------------------------
    def _read_at_head(self, path: str, key: str) -> tuple[str, bytes | None]:
        """(head commit id, content of `path` at that commit or None). The head comes from the commit listing,
        which a commit's parent is checked against; repo info may lag behind it (a cached answer)."""
        head = self._wire.head()
        scratch = Path(tempfile.gettempdir()) / f"relay-hub-{uuid.uuid4().hex[:12]}"
        try:
            found = self._wire.download(path, scratch, revision=head)
            return head, scratch.read_bytes() if found else None
        finally:
            scratch.unlink(missing_ok=True)

    def _download(self, path: str, key: str, dest: Path) -> None:
        if not self._wire.download(path, dest):
            raise StorageError(f"{self.url}: no file at key {key!r}", key=key)

    # ---- keys, errors, retries -----------------------------------------------------------------
    def _join(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _path(self, key: str) -> str:
        parts = PurePosixPath(key).parts
        bad = not key or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts)
        if bad:
            raise StorageError(
                f"invalid storage key {key!r}: keys are relative '/'-separated paths without '..'", key=key
            )
        return self._join(key)

    def _call(self, what: str, key: str, operation: Callable[[], T]) -> T:
        """One operation under the shared retry policy, the client's errors translated."""
        return call_with_retry(
            lambda: self._translated(what, key, operation), policy=self._retry, clock=self._clock, on_retry=_log_retry
        )

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


def _update_operations(path: str, new: bytes | None) -> Callable[[Any], list]:
    """The operations that write `new` at `path` (None: delete it)."""
    if new is None:
        return lambda ops: [ops.Delete(path)]
    return lambda ops: [ops.Add(path, new)]


def _positive(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise UsageError(f"{name}={text!r} is not a positive number", hint=f"unset {name} or give e.g. 100")
    return value


def _log_retry(error: BaseException, attempt: int, wait_s: float) -> None:
    log.warning("%s; try %d in %.1f s", getattr(error, "message", error), attempt, wait_s)
