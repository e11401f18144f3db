"""A stand-in Hugging Face Hub on 127.0.0.1, spoken to by the real `huggingface_hub` client.

Owns: the endpoints Relay's hub backend reaches through huggingface_hub 2.4, answered the way
the client expects (paths, JSON fields, headers), plus fault injection. What each endpoint
follows in the client's source (site-packages/huggingface_hub/):

- GET  /api/whoami-v2                          hf_api.py HfApi._inner_whoami; auth.accessToken.role
- POST /api/repos/create                       hf_api.py HfApi.create_repo (409 exists, 403 not allowed)
- GET  /api/{models,datasets,spaces}/REPO[/revision/REV]  hf_api.py HfApi.model_info / repo_info
- POST /api/models/REPO/preupload/REV          _commit_api.py _fetch_upload_modes (uploadMode "lfs" for *.safetensors,
                                               as a Hub repo's default .gitattributes tracks them with LFS, else
                                               "regular"; "oid" of a file already there — git sha1, or sha256 for
                                               LFS, _commit_api.py CommitOperationAdd._local_oid — so unchanged files
                                               are skipped)
- POST /REPO.git/info/lfs/objects/batch        lfs.py post_lfs_batch_info: basic transfer, an upload href per object
- PUT  /lfs-upload/OID                         lfs.py _upload_single_part (body checked against its sha256); a commit's
                                               lfsFile line (_commit_api.py _payload_as_ndjson) names an uploaded oid.
                                               Xet is not served: the stand-in sets HF_HUB_DISABLE_XET for the client
                                               in its process (constants.py), as the e2e tests' environment does
- POST /api/models/REPO/commit/REV             _commit_api.py _prepare_commit_payload / _send_commit: ndjson
                                               header (parentCommit → 412 when the branch moved), file (base64),
                                               deletedFile, deletedFolder; answers commitUrl + commitOid
- GET  /api/models/REPO/tree/REV[/PATH]        hf_api.py HfApi._iter_repo_tree_pages (PATH quoted with
                                               safe=""; ?recursive; Link header pagination, utils/_pagination.py)
- GET  /api/models/REPO/commits/REV            hf_api.py HfApi.list_repo_commits (id, authors, date, title, message)
- POST /api/models/REPO/super-squash/REV       hf_api.py HfApi.super_squash_history
- POST /api/validate-yaml                      hf_api.py HfApi._validate_yaml (README.md in a commit)
- GET/HEAD /REPO/resolve/REV/PATH              file_download.py (X-Repo-Commit, ETag = git blob sha1,
                                               Content-Length); errors as utils/_http.py hf_raise_for_status
                                               reads them (X-Error-Code RepoNotFound / EntryNotFound / RevisionNotFound)

Faults (`HubServer.faults`): `fail(status, times, path=..., retry_after_s=..., ratelimit_reset_s=...)`
answers the next matching requests with an error (a 429 may carry Retry-After and the IETF RateLimit
headers, as utils/_http.py parse_ratelimit_headers reads them); `hang(times, path=..., seconds=...)`
holds the next matching requests unanswered, then closes the connection without applying them;
`lag_repo_info(times)` answers repo info with the head before the last commit (a cached read);
`take_over(path, content)` lands a commit of another writer (e.g. a new lease.json) just before the next commit; `drop_after_commit()` applies the next commit and closes the
connection without answering; `race_next_commit()` lands a foreign commit just before the next
one; `truncate_next_download()` sends half a file under the full Content-Length.

Must not: be used outside tests; reach the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

PAGE_SIZE = 100  # tree entries per page (small, so listings exercise the client's pagination)
COMMITS_PAGE_SIZE = 50


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    id: str
    title: str
    message: str
    author: str
    date: float
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    type: str
    private: bool
    writers: set[str]
    commits: list[Commit] = field(default_factory=list)  # oldest first

    @property
    def head(self) -> Commit:
        return self.commits[-1]


@dataclass
class Fault:
    status: int
    times: int
    path: str  # regex searched in "METHOD /path"
    retry_after_s: float | None = None
    ratelimit_reset_s: float | None = None  # a 429's RateLimit header: none left, reset in this many seconds
    hang_s: float = 0.0  # > 0: no answer; the connection closes after this many seconds


@dataclass
class Periodic:
    """Every `every`-th request matching `path` fails, with the statuses in turn."""

    every: int
    statuses: tuple[int, ...]
    path: str
    retry_after_s: float | None = None
    seen: int = 0
    injected: int = 0


class Faults:
    """What goes wrong next. Thread-safe; every one-shot fault is used up as it fires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[Fault] = []
        self.periodic: list[Periodic] = []
        self.drop_every_commits = 0  # > 0: the answer of every n-th commit is lost after it was applied
        self.commits_seen = 0
        self.dropped = 0
        self.drop_commits = 0
        self.race_commits = 0
        self.race_files: dict[str, bytes] = {}
        self.truncate_downloads = 0
        self.lag_info = 0
        self.hung = 0  # requests held unanswered so far

    def fail(
        self,
        status: int,
        times: int = 1,
        *,
        path: str = "",
        retry_after_s: float | None = None,
        ratelimit_reset_s: float | None = None,
    ) -> None:
        with self._lock:
            self._errors.append(Fault(status, times, path, retry_after_s, ratelimit_reset_s))

    def hang(self, times: int = 1, *, path: str = "", seconds: float = 5.0) -> None:
        """The next `times` requests matching `path` get no answer; after `seconds` the connection closes."""
        with self._lock:
            self._errors.append(Fault(0, times, path, hang_s=seconds))

    def lag_repo_info(self, times: int = 1) -> None:
        """The next `times` repo-info reads report the head before the last commit (a lagging cache)."""
        with self._lock:
            self.lag_info += times

    def take_over(self, path: str, content: bytes) -> None:
        """Another writer commits `content` at `path` just before the next commit arrives."""
        self.race_next_commit(files={path: content})

    def fail_every(
        self, every: int, statuses: tuple[int, ...], *, path: str = "", retry_after_s: float | None = None
    ) -> Periodic:
        """Every `every`-th request matching `path` fails (statuses in turn); returns the counter."""
        periodic = Periodic(every, statuses, path, retry_after_s)
        with self._lock:
            self.periodic.append(periodic)
        return periodic

    def drop_after_commit(self, times: int = 1) -> None:
        with self._lock:
            self.drop_commits += times

    def race_next_commit(self, times: int = 1, files: dict[str, bytes] | None = None) -> None:
        """Land a foreign commit (writing `files`, default a random race.txt) just before the next commit."""
        with self._lock:
            self.race_commits += times
            self.race_files = dict(files or {})

    def truncate_next_download(self, times: int = 1) -> None:
        with self._lock:
            self.truncate_downloads += times

    def take_error(self, request_line: str) -> Fault | None:
        with self._lock:
            for rule in self.periodic:
                if re.search(rule.path, request_line):
                    rule.seen += 1
                    if rule.seen % rule.every == 0:
                        rule.injected += 1
                        status = rule.statuses[(rule.injected - 1) % len(rule.statuses)]
                        return Fault(status, 1, rule.path, rule.retry_after_s if status == 429 else None)
            for fault in self._errors:
                if fault.times > 0 and re.search(fault.path, request_line):
                    fault.times -= 1
                    return fault
        return None

    def take_periodic_drop(self) -> bool:
        with self._lock:
            self.commits_seen += 1
            if self.drop_every_commits and self.commits_seen % self.drop_every_commits == 0:
                self.dropped += 1
                return True
            return False

    def take(self, name: str) -> bool:
        with self._lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
            return False


class HubState:
    """Users, tokens and repos. One lock: every request sees a consistent Hub."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tokens: dict[str, tuple[str, str]] = {}  # token → (user, role)
        self.orgs: dict[str, set[str]] = {}  # org → members
        self.repos: dict[tuple[str, str], Repo] = {}  # (type, repo_id) → repo
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.lfs: dict[str, bytes] = {}  # sha256 → content of every LFS object uploaded

    def add_token(self, user: str, role: str = "write") -> str:
        token = f"hf_{uuid.uuid4().hex}"
        with self.lock:
            self.tokens[token] = (user, role)
        return token

    def add_repo(self, repo_id: str, *, type: str = "model", owner: str = "", writers: set[str] | None = None) -> Repo:
        repo = Repo(repo_id, type, True, set(writers or {owner or repo_id.split("/")[0]}))
        repo.commits.append(Commit(_oid(), "initial commit", "", "system", time.time(), {}))
        with self.lock:
            self.repos[(type, repo_id)] = repo
        return repo

    def files(self, repo_id: str, type: str = "model") -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[(type, repo_id)].head.files)

    def commits(self, repo_id: str, type: str = "model") -> list[Commit]:
        with self.lock:
            return list(self.repos[(type, repo_id)].commits)

    def may_write(self, user: str, role: str, repo: Repo) -> bool:
        namespace = repo.repo_id.split("/")[0]
        return role == "write" and (user in repo.writers or user in self.orgs.get(namespace, set()))

    def may_create(self, user: str, role: str, namespace: str) -> bool:
        return role == "write" and (namespace == user or user in self.orgs.get(namespace, set()))


def is_lfs(path: str) -> bool:
    """Whether the Hub stores `path` with LFS (a new repo's .gitattributes tracks *.safetensors so)."""
    return path.endswith(".safetensors")


def _oid_of(path: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)


def _fault_headers(fault: Fault) -> dict[str, str]:
    headers = {}
    if fault.retry_after_s is not None:
        headers["Retry-After"] = str(int(fault.retry_after_s))
    if fault.ratelimit_reset_s is not None:
        headers["RateLimit"] = f'"commits";r=0;t={int(fault.ratelimit_reset_s)}'
        headers["RateLimit-Policy"] = '"fixed window";"commits";q=128;w=3600'
    return headers


def _oid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(\w[\w-]*)(?:/(.*))?)?$")
_LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs-upload/([0-9a-f]{64})$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; no 40 ms delayed-ACK stalls
    server: HubServer  # type: ignore[assignment]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    # ---- dispatch --------------------------------------------------------------------------
    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        line = f"{method} {url.path}"
        state = self.server.state
        with state.lock:
            state.requests.append(line)
        fault = self.server.faults.take_error(line)
        if fault is not None and fault.hang_s > 0:
            with self.server.faults._lock:
                self.server.faults.hung += 1
            time.sleep(fault.hang_s)
            self.close_connection = True
            return
        try:
            if fault is not None:
                raise HubError(fault.status, "injected fault", headers=_fault_headers(fault))
            self._route(method, url.path)
        except HubError as err:
            self._json(err.status, {"error": err.message}, code=err.code, extra=err.headers)
        except ConnectionError:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def _route(self, method: str, path: str) -> None:
        if match := _LFS_BATCH.match(path):
            return self._lfs_batch(match.group(1))
        if match := _LFS_PUT.match(path):
            return self._lfs_put(match.group(1))
        if path == "/api/whoami-v2":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create()
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if match := _API.match(path):
            kind, repo_id, action, rest = match.groups()
            return self._api(method, _TYPES[kind], repo_id, action or "", rest or "")
        if match := _RESOLVE.match(path):
            kind, repo_id, rev, file_path = match.groups()
            return self._resolve(
                method, _TYPES.get(kind or "models", "model"), repo_id, unquote(rev), unquote(file_path)
            )
        raise HubError(404, f"no route {method} {path}")

    def _api(self, method: str, type: str, repo_id: str, action: str, rest: str) -> None:
        repo = self._repo(type, repo_id)
        if action in ("", "revision") and method == "GET":
            return self._info(repo)
        if action == "preupload" and method == "POST":
            return self._preupload(repo)
        if action == "commit" and method == "POST":
            return self._commit(repo, unquote(rest))
        if action == "tree" and method == "GET":
            rev, _, sub = rest.partition("/")
            return self._tree(repo, unquote(rev), unquote(sub))
        if action == "commits" and method == "GET":
            return self._commits(repo, unquote(rest))
        if action == "super-squash" and method == "POST":
            return self._squash(repo, unquote(rest))
        raise HubError(404, f"no route {method} {action}")

    # ---- auth ------------------------------------------------------------------------------
    def _who(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        return self.server.state.tokens.get(token) if token else None

    def _need_user(self) -> tuple[str, str]:
        who = self._who()
        if who is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return who

    def _repo(self, type: str, repo_id: str) -> Repo:
        repo = self.server.state.repos.get((type, repo_id))
        who = self._who()
        visible = repo is not None and (not repo.private or (who and self._may_read(who, repo)))
        if not visible:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo  # type: ignore[return-value]

    def _may_read(self, who: tuple[str, str], repo: Repo) -> bool:
        user, _ = who
        return user in repo.writers or user in self.server.state.orgs.get(repo.repo_id.split("/")[0], set())

    def _need_write(self, repo: Repo) -> None:
        user, role = self._need_user()
        if not self.server.state.may_write(user, role, repo):
            raise HubError(403, f"You don't have the rights to write to {repo.repo_id}")

    # ---- endpoints -------------------------------------------------------------------------
    def _whoami(self) -> None:
        user, role = self._need_user()
        orgs = [{"name": org, "type": "org"} for org, members in self.server.state.orgs.items() if user in members]
        self._json(
            200,
            {
                "type": "user",
                "name": user,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "relay", "role": role}},
            },
        )

    def _create(self) -> None:
        user, role = self._need_user()
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        type = payload.get("type") or "model"
        state = self.server.state
        with state.lock:
            if not state.may_create(user, role, namespace):
                raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
            if (type, repo_id) in state.repos:
                raise HubError(409, "You already created this repo", headers={})
            repo = state.add_repo(repo_id, type=type, writers={user})
            repo.private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        prefix = "" if type == "model" else f"{type}s/"
        self._json(200, {"url": f"{self.server.endpoint}/{prefix}{repo_id}", "name": repo_id})

    def _info(self, repo: Repo) -> None:
        with self.server.state.lock:
            lagging = len(repo.commits) > 1 and self.server.faults.take("lag_info")
            head = repo.commits[-2] if lagging else repo.head
            siblings = [{"rfilename": path} for path in sorted(head.files)]
        self._json(200, {"id": repo.repo_id, "sha": head.id, "private": repo.private, "siblings": siblings})

    def _preupload(self, repo: Repo) -> None:
        self._need_write(repo)
        files = json.loads(self.body)["files"]
        with self.server.state.lock:
            current = repo.head.files
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if is_lfs(f["path"]) else "regular",
                    "shouldIgnore": False,
                    **({"oid": _oid_of(f["path"], current[f["path"]])} if f["path"] in current else {}),
                }
                for f in files
            ]
        self._json(200, {"files": answer})

    def _lfs_batch(self, repo_id: str) -> None:
        repo = self._repo("model", repo_id)
        self._need_write(repo)
        payload = json.loads(self.body)
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "the stand-in Hub offers the basic LFS transfer only")
        objects = []
        for obj in payload["objects"]:
            href = f"{self.server.endpoint}/lfs-upload/{obj['oid']}"
            have = obj["oid"] in self.server.state.lfs
            objects.append(
                {"oid": obj["oid"], "size": obj["size"], **({} if have else {"actions": {"upload": {"href": href}}})}
            )
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "the uploaded content does not match its sha256")
        with self.server.state.lock:
            self.server.state.lfs[oid] = self.body
        self._send(200, b"", "text/plain", {})

    def _commit(self, repo: Repo, rev: str) -> None:
        self._need_write(repo)
        user, _ = self._need_user()
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        faults, state = self.server.faults, self.server.state
        with state.lock:
            if rev != "main":
                raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            if faults.take("race_commits"):
                files = dict(repo.head.files) | (faults.race_files or {"race.txt": uuid.uuid4().hex.encode()})
                repo.commits.append(Commit(_oid(), "a concurrent commit", "", "someone-else", time.time(), files))
            parent = header.get("parentCommit")
            if parent and parent != repo.head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = self._apply(dict(repo.head.files), lines, state.lfs)
            commit = Commit(_oid(), header.get("summary", ""), header.get("description", ""), user, time.time(), files)
            repo.commits.append(commit)
        if faults.take("drop_commits") or faults.take_periodic_drop():
            self.close_connection = True
            raise ConnectionError("dropped after applying the commit")
        url = f"{self.server.endpoint}/{repo.repo_id}/commit/{commit.id}"
        self._json(200, {"commitUrl": url, "commitOid": commit.id, "success": True})

    @staticmethod
    def _apply(files: dict[str, bytes], lines: list[dict], lfs: dict[str, bytes]) -> dict[str, bytes]:
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key == "lfsFile":
                if value["oid"] not in lfs:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded", code="LfsNotFound")
                files[value["path"]] = lfs[value["oid"]]
        return files

    def _tree(self, repo: Repo, rev: str, sub: str) -> None:
        files = self._files_at(repo, rev)
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries: dict[str, dict] = {}
        for path in sorted(p for p in files if p.startswith(prefix)):
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                if not recursive:
                    break
            if recursive or len(rest) == 1:
                data = files[path]
                entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if prefix and not entries:
            raise HubError(404, f"{sub} does not exist on {rev}", code="EntryNotFound")
        self._paged(list(entries.values()), PAGE_SIZE)

    def _commits(self, repo: Repo, rev: str) -> None:
        with self.server.state.lock:
            commits = list(reversed(repo.commits))
        items = [
            {
                "id": c.id,
                "authors": [{"user": c.author}],
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.date)),
                "title": c.title,
                "message": c.message,
            }
            for c in commits
        ]
        self._paged(items, COMMITS_PAGE_SIZE)

    def _squash(self, repo: Repo, branch: str) -> None:
        self._need_write(repo)
        message = json.loads(self.body or b"{}").get("message", "squash")
        user, _ = self._need_user()
        with self.server.state.lock:
            repo.commits = [Commit(_oid(), message, "", user, time.time(), dict(repo.head.files))]
        self._json(200, {})

    def _resolve(self, method: str, type: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(type, repo_id)
        with self.server.state.lock:
            head_id = repo.head.id
        files = self._files_at(repo, rev)
        if path not in files:
            raise HubError(404, "Entry not found", code="EntryNotFound")
        data = files[path]
        headers = {"X-Repo-Commit": head_id if rev == "main" else rev, "ETag": f'"{git_blob_sha1(data)}"'}
        if is_lfs(path):  # file_download.py reads X-Linked-Etag (the sha256) for an LFS file
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        truncated = method == "GET" and self.server.faults.take("truncate_downloads")
        self._send(200, data, "application/octet-stream", headers, truncate=truncated)

    def _files_at(self, repo: Repo, rev: str) -> dict[str, bytes]:
        with self.server.state.lock:
            if rev == "main":
                return repo.head.files
            for commit in repo.commits:
                if commit.id == rev:
                    return commit.files
        raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    # ---- answers ---------------------------------------------------------------------------
    def _paged(self, items: list[dict], size: int) -> None:
        start = int(self.query.get("cursor", ["0"])[0])
        page = items[start : start + size]
        headers = {}
        if start + size < len(items):
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in self.query.items()} | {"cursor": str(start + size)}
            link = f"{self.server.endpoint}{url.path}?" + "&".join(f"{k}={v}" for k, v in query.items())
            headers["Link"] = f'<{link}>; rel="next"'
        self._json(200, page, extra=headers)

    def _json(self, status: int, payload: object, *, code: str = "", extra: dict[str, str] | None = None) -> None:
        headers = dict(extra or {})
        if code:
            headers["X-Error-Code"] = code
        if status >= 400 and isinstance(payload, dict):
            headers["X-Error-Message"] = str(payload.get("error", ""))
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str], *, truncate: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class HubServer(ThreadingHTTPServer):
    """The stand-in Hub: `with HubServer() as hub:` serves on 127.0.0.1 until the block ends."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.faults = Faults()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="hubserver", daemon=True)

    def __enter__(self) -> HubServer:
        from huggingface_hub import constants

        self._xet_was_disabled = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True  # the stand-in serves basic LFS, not Xet
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from huggingface_hub import constants

        constants.HF_HUB_DISABLE_XET = self._xet_was_disabled
        self.shutdown()
        self.server_close()

    def requests_matching(self, pattern: str) -> list[str]:
        with self.state.lock:
            return [r for r in self.state.requests if re.search(pattern, r)]
