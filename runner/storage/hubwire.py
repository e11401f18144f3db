"""The Hub's reads over plain HTTP, for runner.storage.hub.

Owns: listing a repo's files and commits (paginated GETs following `Link: rel="next"`, as
huggingface_hub's utils/_pagination.py does), checking that a file exists (HEAD of its resolve
URL), and downloading one file checked against Content-Length and its ETag (git blob sha1 for a
small file, sha256 for an LFS/Xet one; file_download.py reads the same headers).

Why not the client's own calls: list_repo_tree, list_repo_commits and hf_hub_download retry
inside (http_backoff, a resume loop), and Relay retries each operation at one layer only
(runner.storage.retry); hf_hub_download would also keep a second copy in its cache.

Must not: retry, translate errors (the caller does both), or log the token.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from runner.errors import StorageError

BRANCH = "main"
HTTP_TIMEOUT_S = 120.0  # when the caller gives no timeout of its own
DOWNLOAD_CHUNK_BYTES = 1 << 20


class HubWire:
    """Reads of one model repo through `api` (an HfApi: its endpoint and token)."""

    def __init__(self, api: Any, repo_id: str, *, timeout: Any = HTTP_TIMEOUT_S) -> None:
        self.api = api
        self.repo_id = repo_id
        self.timeout = timeout  # seconds, or an httpx Timeout (connect, read, write, pool)

    def head(self) -> str:
        """The branch's head commit id, from the commit listing: what create_commit checks a parent against
        (repo info may come from a cache and lag behind it)."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        url = f"{self._api_root()}/commits/{BRANCH}"
        response = get_session().get(url, params={"limit": "1"}, headers=self._headers(), timeout=self.timeout)
        hf_raise_for_status(response)
        commits = response.json()
        if not commits:
            raise StorageError(f"{self.repo_id}: the branch {BRANCH} has no commits", transient=True)
        return str(commits[0]["id"])

    def list_files(self, path: str) -> set[str]:
        """Every file path under `path` ('' for the whole repo) on the branch; empty when the folder is missing."""
        from huggingface_hub.utils import EntryNotFoundError

        url = f"{self._api_root()}/tree/{BRANCH}" + (f"/{quote(path, safe='')}" if path else "")
        try:
            return {e["path"] for e in self._pages(url, {"recursive": "true"}) if e.get("type") == "file"}
        except EntryNotFoundError:
            return set()

    def find_commit(self, marker: str) -> str | None:
        """The id of the newest commit on the branch whose title contains `marker`, or None."""
        for commit in self._pages(f"{self._api_root()}/commits/{BRANCH}"):
            if marker in commit.get("title", ""):
                return commit["id"]
        return None

    def exists(self, path: str) -> bool:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        response = get_session().head(
            self._url(path), headers=self._headers(), follow_redirects=True, timeout=self.timeout
        )
        if response.status_code == 404:
            return False
        hf_raise_for_status(response)
        return True

    def download(self, path: str, dest: Path, revision: str = BRANCH) -> bool:
        """Write `path` at `revision` to `dest` whole or not at all; False when there is no such file.
        A short or altered body raises a transient StorageError."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        url = self._url(path, revision)
        try:
            with get_session().stream(
                "GET", url, headers=self._headers(), follow_redirects=True, timeout=self.timeout
            ) as response:
                if response.status_code == 404:
                    return False
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                expected = response.headers.get("Content-Length")
                etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or ""
                sha1, sha256, size = _write_stream(response.iter_bytes(DOWNLOAD_CHUNK_BYTES), partial)
            _check(path, size, expected, etag.strip().removeprefix("W/").strip('"'), sha1, sha256)
            os.replace(partial, dest)
            return True
        finally:
            partial.unlink(missing_ok=True)

    def _api_root(self) -> str:
        return f"{self.api.endpoint}/api/models/{self.repo_id}"

    def _url(self, path: str, revision: str = BRANCH) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, path, revision=revision, endpoint=self.api.endpoint)

    def _headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(token=self.api.token, library_name="relay")

    def _pages(self, url: str, params: dict[str, str] | None = None) -> Iterator[dict]:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        next_url: str | None = url
        while next_url:
            response = get_session().get(next_url, params=params, headers=self._headers(), timeout=self.timeout)
            hf_raise_for_status(response)
            yield from response.json()
            next_url, params = response.links.get("next", {}).get("url"), None


def _write_stream(chunks: Any, partial: Path) -> tuple[str, str, int]:
    """Write the chunks to `partial`; (git blob sha1, sha256, size). The blob hash needs the size first,
    so it is computed from the written file."""
    sha256 = hashlib.sha256()
    size = 0
    with open(partial, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            sha256.update(chunk)
            size += len(chunk)
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(partial, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK_BYTES):
            sha1.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest(), size


def _check(path: str, size: int, expected: str | None, etag: str, sha1: str, sha256: str) -> None:
    if expected is not None and expected.isdigit() and int(expected) != size:
        raise StorageError(f"download of {path!r} was cut short ({size} of {expected} bytes)", transient=True)
    if (len(etag) == 40 and etag != sha1) or (len(etag) == 64 and etag != sha256):
        raise StorageError(f"download of {path!r} arrived altered (hash differs from its ETag)", transient=True)
