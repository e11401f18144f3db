"""The stand-in Kaggle API server (see __init__.py): kernel RPCs over HTTP, and a one-at-a-time runner.

Knobs (attributes, set before or during a test):
- `run_pushed`: execute pushed versions (False: record them only, as QUEUED).
- `quota_total_h`, `quota_used_h`: what GetAcceleratorQuotaStatistics reports; runs add their wall
  time to `quota_used_h` as Kaggle's accounting would; `quota_total_h = None` answers 404 (no quota API).
- `save_error`: a message SaveKernel answers in its `error` field (Kaggle refuses the push).
- `busy_pushes`: how many pushes in a row are refused with "Maximum batch GPU session count reached."
  (the account runs its most GPU versions at once; the count is not documented).
- `max_runs`: a bound on executed runs, so a chain that never stops fails the test instead of looping.
- `run_env`: more environment for the runs (the notebook's settings).

The Kaggle facts it reproduces, with sources, are in docs/chain.md.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST, PORT = "127.0.0.1", 7777  # kagglesdk's KaggleEnv.TEST endpoint is http://localhost:7777
PREFIX = "/api/v1/kernels.KernelsApiService/"  # non-PROD endpoints serve the API under /api/v1
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SECRET_VARS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN")
SESSION_TOKEN = "kaggle-notebook-session-token-standin"
"""The notebook's own token, in the file KAGGLE_API_V1_TOKEN names (kagglesdk kaggle_env.py). Where the real
server accepts it is not public; this stand-in accepts it for reads and refuses it for SaveKernel."""


@dataclass
class Version:
    number: int
    source: str
    request: dict  # the SaveKernel body as received
    status: str = "QUEUED"  # kagglesdk KernelWorkerStatus names
    log: str = ""
    exit_code: int | None = None
    seconds: float = 0.0  # how long the run took


@dataclass
class Kernel:
    ref: str  # USER/SLUG
    kernel_id: int
    metadata: dict  # ApiKernelMetadata fields, camelCase
    versions: list[Version] = field(default_factory=list)


class KaggleStandIn:
    def __init__(self, root: Path, *, username: str, key: str, secrets: dict[str, str] | None = None) -> None:
        self.root, self.username, self.key = root, username, key
        self.secrets = {"KAGGLE_USERNAME": username, "KAGGLE_KEY": key, **(secrets or {})}
        self.kernels: dict[str, Kernel] = {}
        self.calls: list[tuple[str, dict]] = []  # (rpc, body) in arrival order
        self.auth_used: list[tuple[str, str]] = []  # (rpc, "key" | "token" | "session" | "none")
        self.run_pushed = True
        self.quota_total_h: float | None = 30.0
        self.quota_used_h = 0.0
        self.save_error: str | None = None
        self.busy_pushes = 0
        self.max_runs = 10
        self.run_env: dict[str, str] = {}
        self.runs = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Kernel, Version] | None] = queue.Queue()
        self._busy = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> KaggleStandIn:
        handler = type("Handler", (_Handler,), {"server_state": self})
        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer((HOST, PORT), handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._runner, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        if self._proc is not None and self._proc.poll() is None:  # a test that failed mid-chain
            self._proc.kill()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def add_kernel(self, ref: str, source: str, **metadata) -> Kernel:
        """The user's notebook, as saved in the editor (version 1, not run)."""
        user, slug = ref.split("/")
        meta = {"id": len(self.kernels) + 1, "ref": ref, "title": slug, "author": user, "slug": slug,
                "language": "python", "kernelType": "notebook", "isPrivate": True, "enableGpu": True,
                "enableInternet": True, "currentVersionNumber": 1, **metadata}  # fmt: skip
        kernel = Kernel(ref, meta["id"], meta, [Version(1, source, {}, status="COMPLETE")])
        self.kernels[ref] = kernel
        return kernel

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no run is queued or running; False on timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._queue.empty() and not self._busy.is_set():
                time.sleep(0.3)  # a run that just ended may still be pushing its successor
                if self._queue.empty() and not self._busy.is_set():
                    return True
            time.sleep(0.2)
        return False

    def pushes(self) -> list[dict]:
        return [body for rpc, body in self.calls if rpc == "SaveKernel"]

    # ------------------------------------------------------------ RPCs

    def handle(self, rpc: str, body: dict, user: str) -> tuple[int, dict]:
        with self._lock:
            self.calls.append((rpc, body))
        if rpc == "GetAcceleratorQuotaStatistics":
            if self.quota_total_h is None:
                return 404, {"code": 404, "message": "Not found"}
            return 200, {"gpuQuota": {"totalTimeAllowed": f"{int(self.quota_total_h * 3600)}s",
                                      "timeUsed": f"{int(self.quota_used_h * 3600)}s", "timeReserved": "0s"}}  # fmt: skip
        ref = body.get("slug") if rpc == "SaveKernel" else f"{body.get('userName')}/{body.get('kernelSlug')}"
        if not ref or ref.split("/")[0] != user:
            return 403, {"code": 403, "message": f"Permission denied on kernel {ref}"}  # only one's own notebooks
        kernel = self.kernels.get(ref)
        if kernel is None:
            return 404, {"code": 404, "message": f"Kernel {ref} not found"}
        if rpc == "GetKernel":
            latest = kernel.versions[-1]
            blob = {"source": latest.source, "language": "python", "kernelType": "notebook", "slug": ref.split("/")[1]}
            return 200, {"metadata": kernel.metadata, "blob": blob}
        if rpc == "SaveKernel":
            return 200, self._save(kernel, body)
        latest = kernel.versions[-1]
        if rpc == "GetKernelSessionStatus":
            return 200, {"status": latest.status}
        if rpc == "ListKernelSessionOutput":
            return 200, {"files": [], "log": latest.log}
        return 404, {"code": 404, "message": f"unknown RPC {rpc}"}

    def _save(self, kernel: Kernel, body: dict) -> dict:
        if self.save_error:
            return {"error": self.save_error}
        if self.busy_pushes > 0:
            self.busy_pushes -= 1
            return {"error": "Maximum batch GPU session count reached."}
        problem = _not_as_the_cli_sends_it(body.get("text") or "")
        if problem:
            return {"error": problem}
        with self._lock:  # `kaggle kernels push` always makes a new version, and that version runs
            version = Version(len(kernel.versions) + 1, body.get("text") or "", body)
            kernel.versions.append(version)
            kernel.metadata.update(currentVersionNumber=version.number, enableGpu=body.get("enableGpu"),
                                   enableInternet=body.get("enableInternet"), machineShape=body.get("machineShape"))  # fmt: skip
        if self.run_pushed:
            self._queue.put((kernel, version))
        url = f"http://localhost:{PORT}/code/{kernel.ref}"
        return {"ref": f"/code/{kernel.ref}", "url": url, "versionNumber": version.number, "kernelId": kernel.kernel_id}

    # ------------------------------------------------------------ the notebook runner

    def _runner(self) -> None:
        while (item := self._queue.get()) is not None:
            self._busy.set()
            try:
                self._run(*item)
            finally:
                self._busy.clear()

    def _run(self, kernel: Kernel, version: Version) -> None:
        if self.runs >= self.max_runs:
            version.status, version.log = "ERROR", f"stand-in: more than {self.max_runs} runs"
            return
        self.runs += 1
        folder = self.root / "runs" / f"{kernel.ref.replace('/', '-')}-v{version.number}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notebook.ipynb").write_text(version.source)
        session_token = folder / "api-v1-token"  # what Kaggle puts in every notebook session
        session_token.write_text(SESSION_TOKEN)
        secrets = folder / "secrets.json"
        secrets.write_text(json.dumps(self.secrets))
        secrets.chmod(0o600)
        (folder / "tmp").mkdir(exist_ok=True)  # a fresh VM per run: its own /tmp, booted now
        env = {
            **self._kaggle_env(secrets, session_token),
            "TMPDIR": str(folder / "tmp"),
            "RELAY_TEST_VM_BOOT_WALL": repr(time.time()),
        }
        version.status = "RUNNING"
        started = time.monotonic()
        self._proc = subprocess.Popen([sys.executable, str(HERE / "execute.py"), str(folder / "notebook.ipynb"),
                                       str(REPO)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        output, _ = self._proc.communicate()
        version.seconds = time.monotonic() - started
        self.quota_used_h += version.seconds / 3600
        version.exit_code, version.log = self._proc.returncode, output
        version.status = "COMPLETE" if version.exit_code == 0 else "ERROR"

    def _kaggle_env(self, secrets: Path, session_token: Path) -> dict[str, str]:
        """What a Kaggle batch run's processes see (docs/platforms.md): Kaggle's variables, among them the
        notebook's session token that kagglesdk prefers (KAGGLE_API_V1_TOKEN, used where
        KAGGLE_KERNEL_RUN_TYPE and KAGGLE_DATA_PROXY_URL are set: kagglesdk kaggle_env.py), and none of
        the user's credentials."""
        env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and not k.startswith("PYTEST")}
        env.update({
            "KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_URL_BASE": "https://www.kaggle.com",
            "KAGGLE_USER_SECRETS_TOKEN": "stand-in", "KAGGLE_API_ENVIRONMENT": "TEST",
            "KAGGLE_DATA_PROXY_URL": "https://dp.kaggle.net", "KAGGLE_API_V1_TOKEN": str(session_token),
            "RELAY_TEST_KAGGLE_SECRETS": str(secrets), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE / "site"), str(REPO)]),
            **self.run_env,
        })  # fmt: skip
        return env


def _not_as_the_cli_sends_it(text: str) -> str:
    """What `kaggle kernels push` would never send (kaggle-cli kaggle_api_extended.py kernels_push: outputs
    cleared, each cell's source one string "as the server expects"); "" when the notebook is fine."""
    try:
        nb = json.loads(text)
    except ValueError:
        return ""  # a script
    for cell in nb.get("cells", []):
        if isinstance(cell.get("source"), list):
            return "a cell's source must be one string"
        if cell.get("outputs"):
            return "a pushed notebook carries no outputs"
    return ""


class _Handler(BaseHTTPRequestHandler):
    server_state: KaggleStandIn

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        state = self.server_state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        user, how = self._user(state)
        rpc = self.path[len(PREFIX) :]
        if not self.path.startswith(PREFIX):
            code, answer = 404, {"code": 404, "message": f"no such path {self.path}"}
        elif not self.headers.get("User-Agent", "").strip():
            code, answer = 400, {"code": 400, "message": "a User-Agent header is required"}
        elif user is None:
            code, answer = 401, {"code": 401, "message": "Unauthenticated"}
        elif how == "session" and rpc == "SaveKernel":  # assume the stricter server
            code, answer = 403, {"code": 403, "message": "the notebook session token may not save kernels"}
        else:
            code, answer = state.handle(rpc, body, user)
        with state._lock:
            state.auth_used.append((rpc, how or "none"))
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _user(self, state: KaggleStandIn) -> tuple[str | None, str]:
        """(user, how): HTTP Basic with username and API key (kagglesdk's username/password) → "key"; a Bearer
        API token → "token"; the notebook's session token → "session"; anything else → (None, "")."""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            return (user, "key") if (user, key) == (state.username, state.key) else (None, "")
        if auth.startswith("Bearer ") and state.secrets.get("KAGGLE_API_TOKEN") == auth[7:]:
            return state.username, "token"
        if auth == f"Bearer {SESSION_TOKEN}":
            return state.username, "session"
        return None, ""

    def log_message(self, *args) -> None:  # quiet
        pass
