"""The Hugging Face Hub backend (`hf://USER/REPO[/PREFIX]`): a private model repo as a run store.

Owns: `HubStorage` (put/get/list/delete/exists over huggingface_hub's HfApi, each write one
commit), what the Hub allows beyond the contract (`commit_folder`: a checkpoint's files and its
COMMIT.json in ONE atomic commit; `delete_folder`: one commit; `update_if_unchanged`: a
compare-and-swap on the branch head; `fence`: every commit conditional on the run's lease), the map
from keys to paths in the repo (under an optional folder), and opening the repo (token check,
private repo created on first use).

Below it, each with one concern: runner.storage.hubcalls makes the calls and commits (the shared
retry policy, error mapping, staying inside the Hub's rate limits, no duplicate commit after a lost
answer, the bounded history); runner.storage.hubfence makes commits conditional on the branch head
(compare-and-swap, the lease's fence); runner.storage.hubwire does the reads over plain HTTP, since
the client's own read calls retry inside; runner.storage.hubhttp gives every request a deadline.

Must not: print, log or store the token; import torch; be imported unless an hf:// URL is used
(huggingface_hub loads lazily here).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from runner.clock import Clock, SystemClock
from runner.errors import StorageError, UsageError
from runner.storage import hubhttp
from runner.storage.hubcalls import ENV_TOKEN, HubAccessError, HubCalls, HubLimits
from runner.storage.hubfence import Fence, FencedCommits
from runner.storage.hubhttp import TOKENS_PAGE
from runner.storage.hubhttp import status_of as _status
from runner.storage.hubwire import HubWire
from runner.storage.retry import RetryPolicy

log = logging.getLogger(__name__)

SCHEME = "hf://"
ENV_ENDPOINT = "HF_ENDPOINT"
"""The Hub to talk to (huggingface_hub's own variable); tests point it at the stand-in on 127.0.0.1."""
ENV_COMMITS_PER_HOUR = "RELAY_HUB_COMMITS_PER_HOUR"
"""Test/advanced: the sustained commit rate instead of HubLimits' 100 (a stand-in Hub has no limit)."""
DEFAULT_ENDPOINT = "https://huggingface.co"
OTHER_REPO_TYPES = ("dataset", "space")


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
        self.limits = limits or HubLimits()
        self._calls = HubCalls(api, self._wire, repo_id=repo_id, url=self.url, clock=self._clock,
                                   retry=retry or RetryPolicy(), limits=self.limits)  # fmt: skip
        self._fenced = FencedCommits(self._calls, self._wire, url=self.url, clock=self._clock)

    def __repr__(self) -> str:
        return f"HubStorage({self.url!r})"

    @property
    def commits_since_squash(self) -> int:
        """Commits made through this instance since the last super-squash."""
        return self._calls.commits_since_squash

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
        self._calls.run("create the repo", "", lambda: self._create_repo(private))
        log.info("created %s model repo %s", "private" if private else "public", self.repo_id)

    def account(self) -> dict:
        """whoami-v2 for the token: name, organisations, the token's role. Rate-limited on the Hub: called once."""
        return self._calls.run("check the token", "", lambda: self._api.whoami())

    def _exists_as(self, repo_type: str) -> bool:
        from huggingface_hub.utils import RepositoryNotFoundError

        def look() -> bool:
            try:
                self._api.repo_info(self.repo_id, repo_type=repo_type)
                return True
            except RepositoryNotFoundError:
                return False

        return self._calls.run("open the repo", "", look)

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
        self._fenced.commit(f"put {key}", key, lambda ops: [ops.Add(path, Path(local_file))])

    def get(self, key: str, local_file: Path) -> None:
        path = self._path(key)
        self._calls.run("download", key, lambda: self._download(path, key, Path(local_file)))

    def list(self, prefix: str) -> list[str]:
        clean = prefix.strip("/")
        if clean:
            self._path(clean)
        found = self._calls.run("list", clean or "/", lambda: self._wire.list_files(self._join(clean)))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(path[strip:] for path in found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not self.exists(key):
            return
        self._fenced.commit(f"delete {key}", key, lambda ops: [ops.Delete(path)], missing_ok=True)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._calls.run("check", key, lambda: self._wire.exists(path))

    # ---- beyond the contract: atomic folders, compare-and-swap, the fence ----------------------
    def commit_folder(self, local_dir: Path, key_prefix: str, names: list[str]) -> None:
        """Upload local_dir/NAME for every name (COMMIT.json among them) as ONE commit under `key_prefix`."""
        base = key_prefix.strip("/")
        keys = [f"{base}/{name}" if base else name for name in names]
        files = [(self._path(key), Path(local_dir) / name) for key, name in zip(keys, names, strict=True)]
        self._fenced.commit(f"commit {base or '/'}", base, lambda ops: [ops.Add(path, src) for path, src in files])

    def delete_folder(self, key_prefix: str) -> None:
        """Remove everything under `key_prefix` in one commit; then squash the history when it is due."""
        base = key_prefix.strip("/")
        path = self._path(base)
        if not self.list(base):
            return
        self._fenced.commit(
            f"delete {base}/", base, lambda ops: [ops.Delete(path + "/", is_folder=True)], missing_ok=True
        )
        self.maybe_squash()

    def update_if_unchanged(self, key: str, decide: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap on `key`: read it at the branch head H, write decide(content) (None: delete) in a
        commit whose parent must be H. If another commit landed meanwhile (412), read again and decide again.
        `decide` may raise to refuse (e.g. LeaseHeld); returns what was written (runner.storage.hubfence)."""
        return self._fenced.update_if_unchanged(self._path(key), key, decide)

    def fence(self, lease_key: str, check: Fence | None) -> None:
        """From now on (until fence(key, None)) every commit without a parent of its own is conditional on a
        head at which `check(content of lease_key)` passes; `check` raises (LeaseLost) to refuse."""
        if check is None:
            self._fenced.unfence()
        else:
            self._fenced.fence(self._path(lease_key), lease_key, check)

    def maybe_squash(self) -> bool:
        """Super-squash the branch if `squash_every_commits` commits piled up (old checkpoints' files leave the
        history, so the repo's storage stops growing). True if it squashed."""
        return self._calls.maybe_squash()

    # ---- reads and keys ------------------------------------------------------------------------
    def _download(self, path: str, key: str, dest: Path) -> None:
        if not self._wire.download(path, dest):
            raise StorageError(f"{self.url}: no file at key {key!r}", key=key)

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


def _positive(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise UsageError(f"{name}={text!r} is not a positive number", hint=f"unset {name} or give e.g. 100")
    return value
