"""A local fake of the Google Drive v2 API, for tests that drive the real pydrive2 client.

Owns: an HTTP server on 127.0.0.1 (random port) that speaks the part of Drive v2 that
pydrive2 and runner.storage.gdrive use — files insert/get/list/update/delete/trash,
media, multipart and resumable uploads, downloads (alt=media and downloadUrl),
md5Checksum/fileSize/modifiedDate — plus an OAuth token endpoint, so the production
credential code (refresh token → access token) runs unchanged against it. Faults can be
switched on: error bursts (429, 5xx, 403 reasons, HTML bodies), connections dropped
mid-upload, duplicate titles, stale listings, storageQuotaExceeded, corrupted uploads.

Must not: reach the network, or be imported by runner/ (it is test code only). It is a
model of Drive's observable behaviour, not of its internals.
"""

from __future__ import annotations

import email.parser
import hashlib
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FOLDER_MIME = "application/vnd.google-apps.folder"
ROOT_ID = "0AfakeRootFolder"
_EPOCH_S = 1_767_225_600  # 2026-01-01T00:00:00Z; modifiedDate advances one second per request
_TERM_RE = re.compile(
    r"^\s*(?:'((?:[^'\\]|\\.)*)'\s+in\s+parents|(\w+)\s*(=|!=)\s*(?:'((?:[^'\\]|\\.)*)'|(true|false)))\s*$"
)


@dataclass
class FakeFile:
    id: str
    title: str
    mime_type: str
    parents: list[str]
    content: bytes = b""
    created_at: int = 0
    """Request number at creation (the fake's clock)."""
    modified_at: int = 0
    trashed: bool = False
    md5_override: str | None = None
    """A wrong md5Checksum to report, to simulate a corrupted upload."""


@dataclass
class _Faults:
    errors: list[tuple[int, str, bool, str]] = field(default_factory=list)
    drops: int = 0
    stale_requests: int = 0
    quota_exceeded: bool = False
    corrupt_uploads: int = 0


def _iso(request_no: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(_EPOCH_S + request_no))


def _unquote(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


class FakeDrive:
    """The fake Drive: state, fault switches and the server. Use as a context manager."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.files: dict[str, FakeFile] = {ROOT_ID: FakeFile(ROOT_ID, "My Drive", FOLDER_MIME, [])}
        self.request_count = 0
        self.requests: list[str] = []
        """'METHOD path' of every API request, in order (token requests excluded)."""
        self.faults = _Faults()
        self.dropped_uploads = 0
        self.refresh_tokens: dict[str, str] = {}
        self.access_tokens: set[str] = set()
        self._ids = itertools.count(1)
        self._uploads: dict[str, dict] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.drive = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakedrive", daemon=True)
        self._thread.start()

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeDrive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- accounts --------------------------------------------------------------------------
    def add_account(self, name: str = "user") -> dict[str, str]:
        """Authorized-user credentials (refresh token) valid against this server's token endpoint."""
        refresh = f"1//fake-refresh-{name}-{next(self._ids)}"
        with self.lock:
            self.refresh_tokens[refresh] = name
        return {
            "type": "authorized_user",
            "client_id": f"fake-client-{name}.apps.googleusercontent.com",
            "client_secret": f"fake-client-secret-{name}",
            "refresh_token": refresh,
            "token_uri": f"{self.endpoint}/token",
        }

    # ---- fault switches --------------------------------------------------------------------
    def fail_next(
        self, count: int, status: int = 429, reason: str = "rateLimitExceeded", *, html: bool = False, method: str = ""
    ) -> None:
        """The next `count` API requests (of `method` only, if given) fail with `status` and `reason`
        (an HTML body if `html`)."""
        with self.lock:
            self.faults.errors.extend([(status, reason, html, method)] * count)

    def drop_next_uploads(self, count: int = 1) -> None:
        """The next `count` upload bodies are cut off: half is read, then the connection closes."""
        with self.lock:
            self.faults.drops += count

    def set_stale_listing(self, requests: int) -> None:
        """files.list omits files created within the last `requests` requests (files.get still sees them)."""
        with self.lock:
            self.faults.stale_requests = requests

    def set_quota_exceeded(self, on: bool = True) -> None:
        """Uploads fail with 403 storageQuotaExceeded (what a service account gets in My Drive)."""
        with self.lock:
            self.faults.quota_exceeded = on

    def corrupt_next_uploads(self, count: int = 1) -> None:
        """The next `count` uploads report an md5Checksum that does not match the bytes sent."""
        with self.lock:
            self.faults.corrupt_uploads += count

    # ---- direct state access for tests -----------------------------------------------------
    def add_file(
        self, parent: str, title: str, content: bytes = b"", *, mime_type: str = "application/octet-stream"
    ) -> str:
        """Create a file (or folder) directly, bypassing the API; duplicates of a title are allowed."""
        with self.lock:
            self.request_count += 1
            file = FakeFile(self._new_id(), title, mime_type, [self.canon(parent)], content)
            file.created_at = file.modified_at = self.request_count
            self.files[file.id] = file
            return file.id

    def add_folder(self, parent: str, title: str) -> str:
        return self.add_file(parent, title, mime_type=FOLDER_MIME)

    def children(self, parent: str, title: str | None = None) -> list[FakeFile]:
        """Untrashed children of `parent` (optionally of one title), oldest first."""
        with self.lock:
            parent = self.canon(parent)
            found = [f for f in self.files.values() if parent in f.parents and not f.trashed]
            return sorted((f for f in found if title is None or f.title == title), key=lambda f: f.created_at)

    def find(self, path: str, root: str = ROOT_ID) -> list[FakeFile]:
        """Every untrashed file at a '/'-path under `root` (more than one when titles are duplicated)."""
        parents = [self.canon(root)]
        *folders, name = path.strip("/").split("/")
        for part in folders:
            parents = [f.id for p in parents for f in self.children(p, part) if f.mime_type == FOLDER_MIME]
        return [f for p in parents for f in self.children(p, name)]

    def canon(self, file_id: str) -> str:
        return ROOT_ID if file_id == "root" else file_id

    def _new_id(self) -> str:
        return f"1fake{next(self._ids):06d}"

    def metadata(self, file: FakeFile) -> dict:
        md5 = file.md5_override or hashlib.md5(file.content).hexdigest()
        meta = {
            "kind": "drive#file",
            "id": file.id,
            "title": file.title,
            "mimeType": file.mime_type,
            "parents": [{"id": p, "isRoot": p == ROOT_ID} for p in file.parents],
            "labels": {"trashed": file.trashed},
            "createdDate": _iso(file.created_at),
            "modifiedDate": _iso(file.modified_at),
        }
        if file.mime_type != FOLDER_MIME:
            meta |= {"md5Checksum": md5, "fileSize": str(len(file.content))}
            meta["downloadUrl"] = f"{self.endpoint}/download/{file.id}"
        return meta

    def query(self, q: str) -> list[FakeFile]:
        """Evaluate a Drive v2 `q` made of and-ed terms: 'ID' in parents, title/mimeType =/!=, trashed = bool."""
        preds = []
        for term in filter(None, re.split(r"\s+and\s+", q.strip())) if q else []:
            m = _TERM_RE.match(term)
            if not m:
                raise ValueError(f"fake Drive cannot parse query term {term!r}")
            parent, name, op, text, boolean = m.groups()
            preds.append(_predicate(self.canon(_unquote(parent)) if parent else None, name, op, text, boolean))
        with self.lock:
            horizon = self.request_count - self.faults.stale_requests
            visible = [f for f in self.files.values() if f.id != ROOT_ID and f.created_at <= horizon]
            return sorted((f for f in visible if all(p(f) for p in preds)), key=lambda f: f.id)


def _predicate(parent, name, op, text, boolean):
    if parent is not None:
        return lambda f: parent in f.parents
    attr = {"title": "title", "mimeType": "mime_type", "trashed": "trashed"}.get(name)
    if attr is None:
        raise ValueError(f"fake Drive does not support query field {name!r}")
    want = (boolean == "true") if boolean else _unquote(text)
    return (lambda f: getattr(f, attr) == want) if op == "=" else (lambda f: getattr(f, attr) != want)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()  # headers and body go out as two writes: without NODELAY each costs a delayed ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read FakeDrive.requests
        pass

    @property
    def drive(self) -> FakeDrive:
        return self.server.drive  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---- plumbing --------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if isinstance(body, dict):
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, reason: str, message: str = "", html: bool = False) -> None:
        if html:
            self._send(status, b"<html><body>Bad Gateway</body></html>", {"Content-Type": "text/html"})
            return
        message = message or reason
        err = {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
        self._send(status, {"error": err})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/token":
            return self._token()
        if not self._authorized():
            return self._error(401, "authError", "Invalid Credentials")
        drive = self.drive
        with drive.lock:
            drive.request_count += 1
            drive.requests.append(f"{method} {url.path}")
            due = [f for f in drive.faults.errors if f[3] in ("", method)]
            fault = due[0] if due else None
            if fault:
                drive.faults.errors.remove(fault)
        if fault:
            self._body()
            return self._error(fault[0], fault[1], html=fault[2])
        try:
            self._route(method, url.path)
        except KeyError as missing:
            self._error(404, "notFound", f"File not found: {missing.args[0]}")

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.drive.access_tokens

    def _token(self) -> None:
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(self._body().decode()).items()}
        drive = self.drive
        grant = form.get("grant_type", "")
        known = grant == "refresh_token" and form.get("refresh_token") in drive.refresh_tokens
        if not known and not grant.endswith("jwt-bearer"):
            return self._send(
                400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
            )
        token = f"ya29.fake-{next(drive._ids)}"
        with drive.lock:
            drive.access_tokens.add(token)
        self._send(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    def _route(self, method: str, path: str) -> None:
        parts = path.strip("/").split("/")
        if parts[:3] == ["drive", "v2", "files"]:
            return self._files(method, parts[3:])
        if parts[:4] == ["upload", "drive", "v2", "files"]:
            return self._upload_start(method, parts[4:])
        if parts[:2] == ["upload", "session"] and method == "PUT":
            return self._upload_data(parts[2])
        if parts[0] == "download" and method == "GET":
            return self._send(200, self.drive.files[parts[1]].content)
        self._error(404, "notFound", f"no route {method} {path}")

    # ---- files resource --------------------------------------------------------------------
    def _files(self, method: str, rest: list[str]) -> None:
        drive = self.drive
        if not rest:
            return self._list() if method == "GET" else self._insert(json.loads(self._body() or b"{}"), None)
        file = drive.files[drive.canon(rest[0])]
        if rest[1:] in (["trash"], ["untrash"]):
            file.trashed = rest[1] == "trash"
            return self._send(200, drive.metadata(file))
        if method == "GET":
            if self.query.get("alt") == "media":
                return self._send(200, file.content)
            return self._send(200, drive.metadata(file))
        if method == "DELETE":
            self._delete_tree(file.id)
            return self._send(204)
        self._apply(file, json.loads(self._body() or b"{}"), None)
        self._send(200, drive.metadata(file))

    def _list(self) -> None:
        drive = self.drive
        try:
            found = drive.query(self.query.get("q", ""))
        except ValueError as bad:
            return self._error(400, "invalidQuery", str(bad))
        size = max(1, min(int(self.query.get("maxResults") or 100), 1000))
        start = int(self.query.get("pageToken") or 0)
        page = {"kind": "drive#fileList", "items": [drive.metadata(f) for f in found[start : start + size]]}
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        self._send(200, page)

    def _delete_tree(self, file_id: str) -> None:
        drive = self.drive
        with drive.lock:
            for child in [f.id for f in drive.files.values() if file_id in f.parents]:
                self._delete_tree(child)
            drive.files.pop(file_id, None)

    def _insert(self, meta: dict, content: bytes | None) -> None:
        drive = self.drive
        with drive.lock:
            parents = [drive.canon(p["id"]) for p in meta.get("parents") or [{"id": ROOT_ID}]]
            for parent in parents:
                drive.files[parent]  # noqa: B018 - KeyError → 404, as Drive answers for a missing parent
            file = FakeFile(
                drive._new_id(),
                meta.get("title") or "Untitled",
                meta.get("mimeType") or "application/octet-stream",
                parents,
            )
            file.created_at = drive.request_count
            drive.files[file.id] = file
        self._apply(file, {}, content)
        self._send(200, drive.metadata(file))

    def _apply(self, file: FakeFile, meta: dict, content: bytes | None) -> None:
        drive = self.drive
        with drive.lock:
            file.title = meta.get("title", file.title)
            file.mime_type = meta.get("mimeType", file.mime_type)
            if content is not None:
                file.content = content
                file.md5_override = None
                if drive.faults.corrupt_uploads:
                    drive.faults.corrupt_uploads -= 1
                    file.md5_override = hashlib.md5(content + b"!").hexdigest()
            file.modified_at = drive.request_count

    # ---- uploads ---------------------------------------------------------------------------
    def _upload_start(self, method: str, rest: list[str]) -> None:
        drive = self.drive
        kind = self.query.get("uploadType", "media")
        if drive.faults.quota_exceeded:
            self._body()
            message = "The user's Drive storage quota has been exceeded."
            return self._error(403, "storageQuotaExceeded", message)
        target = drive.files[rest[0]].id if rest else None
        body = self._body()
        if kind == "resumable":
            upload_id = f"up{next(drive._ids)}"
            with drive.lock:
                drive._uploads[upload_id] = {"target": target, "meta": json.loads(body or b"{}")}
            return self._send(200, b"", {"Location": f"{drive.endpoint}/upload/session/{upload_id}"})
        meta, content = ({}, body) if kind == "media" else _split_multipart(self.headers.get("Content-Type", ""), body)
        self._finish_upload(target, meta, content)

    def _upload_data(self, upload_id: str) -> None:
        drive = self.drive
        length = int(self.headers.get("Content-Length") or 0)
        with drive.lock:
            drop = drive.faults.drops > 0 and length > 1
            drive.faults.drops -= 1 if drop else 0
        if drop:
            self.rfile.read(length // 2)
            drive.dropped_uploads += 1
            self.close_connection = True
            self.connection.close()
            return
        data = self.rfile.read(length)
        pending = drive._uploads[upload_id]
        pending.setdefault("data", bytearray())
        match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", self.headers.get("Content-Range", ""))
        if match:
            start, end, total = match.groups()
            del pending["data"][int(start) :]
            pending["data"] += data
            if total == "*" or int(end) + 1 < int(total):
                return self._send(308, b"", {"Range": f"bytes=0-{int(end)}"})
        else:
            pending["data"] += data
        drive._uploads.pop(upload_id, None)
        self._finish_upload(pending["target"], pending["meta"], bytes(pending["data"]))

    def _finish_upload(self, target: str | None, meta: dict, content: bytes) -> None:
        if target is None:
            return self._insert(meta, content)
        file = self.drive.files[target]
        self._apply(file, meta, content)
        self._send(200, self.drive.metadata(file))


def _split_multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    meta_part, media_part = message.get_payload()
    return json.loads(meta_part.get_payload(decode=True) or b"{}"), media_part.get_payload(decode=True) or b""


def make_fake_account(server: FakeDrive, home: Path) -> dict[str, str]:
    """Write a distinct credential file under `home`; return env vars pointing Relay at `server`."""
    from runner.storage.credentials import write_credentials_file

    info = server.add_account(home.name or "user")
    path = home / ".config" / "relay" / "gdrive-credentials.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_credentials_file(info, path)
    return {"RELAY_GDRIVE_ENDPOINT": server.endpoint, "RELAY_GDRIVE_CREDENTIALS": str(path)}
