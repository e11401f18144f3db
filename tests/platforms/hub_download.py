"""Stand-in for the Hugging Face Hub's download side: model repos served from local folders.

Point HF_ENDPOINT at `url` (huggingface_hub reads it at import: set it before the process starts)
with HF_HUB_DISABLE_XET=1, and `hf_hub_download` (diffusers' and transformers' from_pretrained)
downloads from here. It answers as huggingface_hub 2.x's file_download.py / utils/_http.py expect:
`HEAD|GET /{repo_id}/resolve/{revision}/{path}` gives 200 with `X-Repo-Commit` (the commit the
revision resolves to), `ETag` (the content's sha256, quoted), `Content-Length` and, for GET, the
bytes; a missing file gives 404 with `X-Error-Code: EntryNotFound` (a missing repo:
`RepoNotFound`), which huggingface_hub raises as its EntryNotFoundError / RepositoryNotFoundError.
`GET /api/models/{repo_id}/revision/{revision}` answers repo_info (the commit, the files: diffusers
resolves the revision once per component); `GET /api/models/{repo_id}/tree/{revision}/{folder}` lists
a folder (transformers' tokenizer loader asks for additional_chat_templates/: a missing folder is
404 EntryNotFound, which it skips).
Files are served directly (no redirect to a CDN), which the client accepts. Records every request,
so a test can count the bytes each file cost. Download only: commits are tests/hubserver/.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubDownloadServer:
    """`repos` maps "owner/name" to a local folder laid out as the repo is."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.bytes_sent: Counter[str] = Counter()  # "repo/file" → body bytes sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, hf_home: Path) -> dict[str, str]:
        """Variables for a process that downloads from here into a fresh cache."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "DISABLE_SAFETENSORS_CONVERSION": "1"}  # fmt: skip

    def downloaded(self, repo: str) -> dict[str, int]:
        """Bytes sent per file of `repo` (GET bodies only)."""
        prefix = repo + "/"
        return {k[len(prefix) :]: v for k, v in self.bytes_sent.items() if k.startswith(prefix) and v}

    def _resolve(self, url_path: str) -> tuple[str, Path | None, str]:
        """(error code or "", file, "repo/file") of a /{owner}/{name}/resolve/{rev}/{file} path."""
        parts = unquote(url_path.split("?", 1)[0]).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return "RepoNotFound", None, ""
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if repo not in self.repos:
            return "RepoNotFound", None, ""
        path = self.repos[repo] / filename
        if ".." in parts or not path.is_file():
            return "EntryNotFound", None, f"{repo}/{filename}"
        return "", path, f"{repo}/{filename}"

    def _api(self, url_path: str) -> tuple[int, dict | list]:
        """(status, JSON) of /api/models/{owner}/{name}/revision/{rev} (repo_info: the commit and the files)
        and /api/models/{owner}/{name}/tree/{rev}[/{folder}] (a folder's entries)."""
        parts = unquote(url_path.split("?", 1)[0]).lstrip("/").split("/")
        repo = "/".join(parts[2:4])
        if len(parts) < 6 or repo not in self.repos or ".." in parts:
            return 404, {"error": "Repository not found", "code": "RepoNotFound"}
        root = self.repos[repo]
        if parts[4] == "revision":
            files = sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
            return 200, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
        folder = root.joinpath(*parts[6:])
        if parts[4] != "tree" or not folder.is_dir():
            return 404, {"error": "Entry not found", "code": "EntryNotFound"}
        entries = []
        for child in sorted(folder.iterdir()):
            kind = "file" if child.is_file() else "directory"
            size = child.stat().st_size if kind == "file" else 0
            entries.append({"type": kind, "path": child.relative_to(root).as_posix(), "oid": COMMIT, "size": size})
        return 200, entries

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if self.path.startswith("/api/models/"):
                    return self._listing()
                error, path, key = hub._resolve(self.path)
                if error:
                    self.send_response(404)
                    self.send_header("X-Error-Code", error)
                    self.send_header(
                        "X-Error-Message", "Entry not found" if error == "EntryNotFound" else "Repository not found"
                    )
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)
                    hub.bytes_sent[key] += len(data)

            def _listing(self) -> None:
                status, payload = hub._api(self.path)
                blob = json.dumps(payload).encode()
                self.send_response(status)
                if status != 200:
                    self.send_header("X-Error-Code", payload["code"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def __enter__(self) -> HubDownloadServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
