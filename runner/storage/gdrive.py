"""The Google Drive API backend (`gdrive://FOLDER_ID` or `gdrive://My Drive/relay`).

Owns: `DriveStorage` (put/get/list/delete/exists over Drive API v2 through pydrive2's
GoogleDrive/GoogleDriveFile objects) and the map from '/'-keys to Drive folders and file ids.
Connecting, token refresh, the meaning of Drive's errors and retries are runner.storage.gdriveclient's:
every operation here is one `DriveCalls.run`.

Drive is not a file system, and this module makes it behave like one for Relay:
- Several files may share a title in one folder. A key resolves to one file deterministically
  (newest modifiedDate, then largest id); folders to the oldest (createdDate, then smallest id)
  so a later duplicate folder never hides what is already stored. A put updates the chosen
  file in place (same id) or inserts one, then deletes the other duplicates.
- Uploads are verified against Drive's md5Checksum; downloads against it too.
- Listings (files.list) can lag behind writes. A put remembers the file id it wrote, and
  exists/get/put look that id up with files.get (strongly consistent) before trusting a
  listing, so "COMMIT.json written last" is visible at once to the writer. list() adds the keys
  this instance wrote and drops those it deleted.
- Deletes are real deletes (files.delete): trash still counts against a free account's 15 GB
  and Relay deletes only checkpoints it has superseded. Where the account may not delete
  (a Shared Drive contributor), it falls back to trash. Folders left empty are deleted too.

Must not: use pydrive2.fs (it resolves paths to the smallest id, duplicates on every put and
does not retry 429); import pydrive2 at module level; log or raise anything that contains a
credential; know anything of torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.clock import Clock, SystemClock
from runner.errors import StorageError, UsageError
from runner.storage.credentials import DEFAULT_SECRET_LOOKUPS, DriveCredentials, SecretLookup, find_credentials
from runner.storage.gdriveclient import RATE_REASONS, DriveCalls, DriveClient, connect, http_details
from runner.storage.retry import RetryPolicy

log = logging.getLogger(__name__)

ENV_ENDPOINT = "RELAY_GDRIVE_ENDPOINT"
"""Test/advanced: the API root to talk to instead of https://www.googleapis.com/ (e.g. a fake server)."""
SCHEME = "gdrive://"
FOLDER_MIME = "application/vnd.google-apps.folder"
PAGE_SIZE = 1000  # files.list maxResults (Drive's maximum)
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_gdrive_url(url: str) -> tuple[str, tuple[str, ...]]:
    """`gdrive://ID[/sub/dirs]` or `gdrive://My Drive/dirs` → (base folder id or 'root', sub-folders)."""
    if not url.startswith(SCHEME):
        raise UsageError(f"not a Google Drive URL: {url!r}", hint="use gdrive://FOLDER_ID or gdrive://My Drive/relay")
    rest = url[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise UsageError(
            f"{SCHEME}… URLs take no parameters: {url.split('?')[0]}?…",
            hint="pass credentials through RELAY_GDRIVE_CREDENTIALS or a notebook secret, never in the URL",
        )
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise UsageError(f"{url!r} names no folder", hint="use gdrive://FOLDER_ID or gdrive://My Drive/relay")
    if parts[0].lower() in ("my drive", "root"):
        return "root", tuple(parts[1:])
    if not _ID_RE.match(parts[0]):
        raise UsageError(
            f"{parts[0]!r} in {url!r} is not a Drive folder id", hint="for a path write gdrive://My Drive/…"
        )
    return parts[0], tuple(parts[1:])


def open_gdrive(
    url: str,
    *,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    credentials: DriveCredentials | None = None,
    secret_lookups: tuple[tuple[str, SecretLookup], ...] = DEFAULT_SECRET_LOOKUPS,
    retry: RetryPolicy | None = None,
) -> DriveStorage:
    """Open a `gdrive://` URL. Credentials are looked up in `env` and notebook secrets (see credentials.py)."""
    env = os.environ if env is None else env
    base, subdirs = parse_gdrive_url(url)
    credentials = credentials or find_credentials(env, secret_lookups=secret_lookups)
    client = connect(credentials, env.get(ENV_ENDPOINT) or None)
    return DriveStorage(client, url=url, base_id=base, subdirs=subdirs, clock=clock or SystemClock(), retry=retry)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: use a relative 'dir/name' path", key=key)
    return key


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _newest(files: list[dict]) -> dict | None:
    return max(files, key=lambda f: (f.get("modifiedDate", ""), f["id"]), default=None)


def _oldest(files: list[dict]) -> dict | None:
    return min(files, key=lambda f: (f.get("createdDate", ""), f["id"]), default=None)


class DriveStorage:
    """Storage over one Drive folder. Thread-safe: uploads may run in a background thread."""

    def __init__(
        self,
        client: DriveClient,
        *,
        url: str,
        base_id: str,
        subdirs: tuple[str, ...] = (),
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url
        self._client = client
        self._drive = client.drive
        self._base_id = base_id
        self._subdirs = subdirs
        self._clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._calls = DriveCalls(client, url=url, clock=self._clock, retry=retry or RetryPolicy(), lock=self._lock)
        self._folders: dict[str, str] = {}  # '' → root id, 'a/b' → folder id
        self._files: dict[str, str] = {}  # key → file id this instance wrote or found
        self._written: set[str] = set()
        self._deleted: set[str] = set()
        self._extra: dict[str, Any] = {}  # list() parameters for a Shared Drive root

    def __repr__(self) -> str:
        return f"DriveStorage({self.url!r}, {self._client.credentials.kind})"

    # ---- the Storage protocol --------------------------------------------------------------
    def put(self, local_file: Path, key: str) -> None:
        _check_key(key)
        try:
            md5 = _md5(local_file)
        except OSError as err:
            raise StorageError(f"cannot read {local_file} to upload it as {key!r}: {err.strerror}", key=key) from None
        self._calls.run("upload", key, lambda: self._put_once(Path(local_file), key, md5))

    def get(self, key: str, local_file: Path) -> None:
        _check_key(key)
        self._calls.run("download", key, lambda: self._get_once(key, Path(local_file)))

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        found = self._calls.run("list", prefix or "/", lambda: self._list_once(prefix))
        with self._lock:
            under = {k for k in self._written if not prefix or k.startswith(prefix + "/")}
            return sorted((found | under) - self._deleted)

    def delete(self, key: str) -> None:
        _check_key(key)
        self._calls.run("delete", key, lambda: self._delete_once(key))

    def exists(self, key: str) -> bool:
        _check_key(key)
        return self._calls.run("check", key, lambda: self._resolve(key) is not None)

    # ---- one attempt of each operation -----------------------------------------------------
    def _put_once(self, local_file: Path, key: str, md5: str) -> None:
        folder, name = self._parent(key, create=True)
        existing = self._candidates(key, folder, name)
        target = _newest(existing)
        meta = {"id": target["id"]} if target else {"title": name, "parents": [{"id": folder}]}
        file = self._drive.CreateFile(meta)
        file.SetContentFile(str(local_file))
        try:
            file.Upload()
        except self._client.api_errors as err:
            if http_details(err)[0] != 404:
                raise
            self._forget(key)  # a cached folder or file id went away (deleted elsewhere): look up again
            raise StorageError(f"a Drive folder of {key!r} vanished during upload", key=key, transient=True) from None
        finally:
            file.content.close()
        with self._lock:
            self._files[key] = file["id"]
        if file.metadata.get("md5Checksum") != md5:
            raise StorageError(
                f"upload of {key!r} to {self.url} arrived altered (md5 differs)", key=key, transient=True
            )
        for duplicate in existing:
            if duplicate["id"] != file["id"]:
                log.info("removing duplicate Drive file %s for %s", duplicate["id"], key)
                self._delete_id(duplicate["id"])
        with self._lock:
            self._written.add(key)
            self._deleted.discard(key)

    def _get_once(self, key: str, local_file: Path) -> None:
        meta = self._resolve(key)
        if meta is None:
            raise StorageError(f"{key!r} not found in {self.url}", key=key)
        local_file.parent.mkdir(parents=True, exist_ok=True)
        partial = local_file.with_name(f".{local_file.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._drive.CreateFile({"id": meta["id"]}).GetContentFile(str(partial))
            if meta.get("md5Checksum") and _md5(partial) != meta["md5Checksum"]:
                raise StorageError(f"download of {key!r} from {self.url} arrived altered", key=key, transient=True)
            os.replace(partial, local_file)
        finally:
            partial.unlink(missing_ok=True)

    def _list_once(self, prefix: str) -> set[str]:
        start = self._folder_id(prefix, create=False)
        found: set[str] = set()
        pending = [(start, prefix)] if start else []
        while pending:
            folder, path = pending.pop()
            for child in self._children(folder):
                child_key = f"{path}/{child['title']}" if path else child["title"]
                if child["mimeType"] == FOLDER_MIME:
                    pending.append((child["id"], child_key))
                else:
                    found.add(child_key)
        return found

    def _delete_once(self, key: str) -> None:
        folder, name = self._parent(key, create=False)
        ids = {f["id"] for f in self._candidates(key, folder, name)} if folder else set()
        with self._lock:
            cached = self._files.get(key)
        ids |= {cached} if cached else set()
        for file_id in sorted(ids):
            self._delete_id(file_id)
        with self._lock:
            self._files.pop(key, None)
            self._written.discard(key)
            self._deleted.add(key)
        if ids and folder:
            self._prune(key.rpartition("/")[0])

    def _prune(self, path: str) -> None:
        """Delete folders left empty by a delete, up to the root, as LocalStorage does (deleted
        checkpoints leave no husk, and list() does not walk them). A folder holding a key this
        instance wrote is kept even if the listing lags and shows it empty."""
        while path:
            with self._lock:
                folder = self._folders.get(path)
                recent = any(k.startswith(path + "/") for k in self._written)
            if folder is None or recent or self._children(folder):
                return
            self._delete_id(folder)
            self._forget(path)
            path = path.rpartition("/")[0]

    def _forget(self, key: str) -> None:
        """Drop the cached file id of `key` and every cached folder id but the root's (one may be gone)."""
        with self._lock:
            self._files.pop(key, None)
            root = self._folders.get("")
            self._folders = {"": root} if root else {}

    # ---- lookups ---------------------------------------------------------------------------
    def _resolve(self, key: str) -> dict | None:
        """The file `key` maps to, or None."""
        folder, name = self._parent(key, create=False)
        return _newest(self._candidates(key, folder, name)) if folder else self._by_cached_id(key, None, None)

    def _candidates(self, key: str, folder: str, name: str) -> list[dict]:
        """Every untrashed file titled `name` in `folder`, including the one this instance last wrote
        even when files.list does not show it yet."""
        found = self._children(folder, title=name, folders=False)
        cached = self._by_cached_id(key, folder, name)
        if cached and all(f["id"] != cached["id"] for f in found):
            found.append(cached)
        return found

    def _by_cached_id(self, key: str, folder: str | None, name: str | None) -> dict | None:
        with self._lock:
            file_id = self._files.get(key)
        if not file_id:
            return None
        file = self._drive.CreateFile({"id": file_id})
        try:
            file.FetchMetadata()
        except self._client.api_errors as err:
            if http_details(err)[0] != 404:
                raise
            file.metadata = {}
        meta = dict(file.metadata)
        parents = {p.get("id") for p in meta.get("parents", [])}
        alive = meta and not meta.get("labels", {}).get("trashed") and meta.get("title") == (name or meta.get("title"))
        if alive and (folder is None or folder in parents):
            return meta
        with self._lock:
            self._files.pop(key, None)
        return None

    def _children(self, folder: str, *, title: str | None = None, folders: bool | None = None) -> list[dict]:
        terms = [f"{_quote(folder)} in parents", "trashed = false"]
        if title is not None:
            terms.append(f"title = {_quote(title)}")
        if folders is not None:
            terms.append(f"mimeType {'=' if folders else '!='} {_quote(FOLDER_MIME)}")
        query = {"q": " and ".join(terms), "maxResults": PAGE_SIZE, **self._extra}
        return [dict(f.metadata) for page in self._drive.ListFile(query) for f in page]

    def _parent(self, key: str, *, create: bool) -> tuple[str | None, str]:
        folder, _, name = key.rpartition("/")
        return self._folder_id(folder, create=create), name

    def _folder_id(self, path: str, *, create: bool) -> str | None:
        """The id of folder `path` under the root; created when `create`, else None when missing."""
        with self._lock:  # one thread at a time creates folders, so none is created twice
            parent = self._root_id()
            walked = ""
            for part in path.split("/") if path else []:
                walked = f"{walked}/{part}" if walked else part
                if walked not in self._folders:
                    child = self._child_folder(parent, part, create)
                    if child is None:
                        return None
                    self._folders[walked] = child
                parent = self._folders[walked]
            return parent

    def _child_folder(self, parent: str, name: str, create: bool) -> str | None:
        found = _oldest(self._children(parent, title=name, folders=True))
        if found is not None:
            return found["id"]
        if not create:
            return None
        folder = self._drive.CreateFile({"title": name, "parents": [{"id": parent}], "mimeType": FOLDER_MIME})
        folder.Upload()
        return folder["id"]

    def _root_id(self) -> str:
        with self._lock:
            if "" not in self._folders:
                self._folders[""] = self._open_root()
            return self._folders[""]

    def _open_root(self) -> str:
        base = self._drive.CreateFile({"id": self._base_id})
        try:
            base.FetchMetadata(fields="id,title,mimeType,labels,driveId")
        except self._client.api_errors as err:
            if http_details(err)[0] == 404:
                raise StorageError(
                    f"Drive folder {self._base_id!r} of {self.url} not found for {self._client.credentials.account}",
                    hint="check the folder id (the last part of the folder's web address) and that it is shared "
                    "with this account; for a folder in My Drive by name write gdrive://My Drive/NAME",
                ) from None
            raise
        if base.metadata.get("mimeType") != FOLDER_MIME or base.metadata.get("labels", {}).get("trashed"):
            raise StorageError(f"{self.url}: {self._base_id!r} is not a folder (or is in the trash)")
        if base.metadata.get("driveId"):
            self._extra = {"corpora": "drive", "driveId": base.metadata["driveId"]}
        parent = base.metadata["id"]
        for name in self._subdirs:
            parent = self._child_folder(parent, name, create=True) or parent
        return parent

    def _delete_id(self, file_id: str) -> None:
        file = self._drive.CreateFile({"id": file_id})
        try:
            file.Delete()
        except self._client.api_errors as err:
            status, reason, _ = http_details(err)
            if status == 404:
                return
            if status != 403 or reason in RATE_REASONS:
                raise
            log.info("no permission to delete Drive file %s (%s); moving it to the trash", file_id, reason)
            file.Trash()
