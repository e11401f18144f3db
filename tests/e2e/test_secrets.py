"""Secrets stay secret: a run with a Hugging Face token and Drive credentials leaks neither.

A short tiny run trains into `gdrive://…` on the fake Drive server (tests/fakedrive.py) with a
fake HF_TOKEN and fake OAuth credentials (client secret, refresh token; the server issues the
access tokens), logging with -v. Every secret string must be absent from stdout/stderr, from
every file the run stored (run.json, sessions.jsonl, checkpoints, cache, final/ and its model
card, TensorBoard logs) and from every file left in the workdir, home and working directory; an
error against the same storage must not echo them either; credential files Relay writes are
mode 0600 (their folder 0700).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import RUN, relay_env, train_args
from tests.fakedrive import ROOT_ID, FakeDrive, make_fake_account

HF_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def secrets_of(server: FakeDrive, account: dict[str, str]) -> list[str]:
    import json

    info = json.loads(Path(account["RELAY_GDRIVE_CREDENTIALS"]).read_text())
    found = [HF_TOKEN, info["client_secret"], info["refresh_token"], *server.access_tokens]
    assert all(len(s) >= 10 for s in found), found
    return found


def files_under(*roots: Path, skip: Path | None = None) -> list[Path]:
    out = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and (skip is None or skip not in path.parents):
                out.append(path)
    return out


def leaks(secrets: list[str], texts: dict[str, bytes]) -> list[str]:
    return [f"{where} contains {s[:8]}…" for where, blob in texts.items() for s in secrets if s.encode() in blob]


def test_no_secret_in_logs_storage_files_or_errors(tmp_path, reliability):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    with FakeDrive() as server:
        folder = server.add_folder(ROOT_ID, "relay")
        account = make_fake_account(server, home)
        env = relay_env({**account, "HF_TOKEN": HF_TOKEN, "HOME": str(home)})
        args = ["-v", *train_args(f"gdrive://{folder}", tmp_path / "work", steps=2)]
        done = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        server.set_quota_exceeded(True)  # now an error that names the storage and the failing call
        failed = subprocess.run([sys.executable, "-m", "runner", *args[:-2], "--set", "train.steps=4", "--run", "other"],
                                cwd=cwd, env=env, capture_output=True, timeout=600)  # fmt: skip
        secrets = secrets_of(server, account)
        stored = {f"drive:{f.title}": f.content for f in server.files.values()}
    titles = {name.split(":", 1)[1] for name in stored}
    for expected in ("run.json", "sessions.jsonl", "lora.safetensors", "README.md", "COMMIT.json"):
        assert expected in titles, f"{expected} was not stored; the scan would prove nothing"
    assert failed.returncode != 0 and b"quota" in failed.stderr.lower(), failed.stderr[-2000:]
    texts = {"stdout": done.stdout, "stderr": done.stderr, "error stdout": failed.stdout, "error stderr": failed.stderr}
    texts |= stored
    cred_file = Path(account["RELAY_GDRIVE_CREDENTIALS"])
    texts |= {str(p): p.read_bytes() for p in files_under(tmp_path / "work", home, cwd) if p != cred_file}
    found = leaks(secrets, texts)
    assert not found, found
    assert b"INFO" in done.stderr, "-v logged nothing: the log scan would prove nothing"
    assert f"{RUN}/final".encode() in done.stdout + done.stderr or "README.md" in titles
    reliability.record("secrets in logs, storage, workdir and errors", test="test_no_secret_in_logs_storage_files_or_errors",
                       injected=len(secrets), survived=True)  # fmt: skip


def test_credential_files_relay_writes_are_private(tmp_path):
    from runner.storage.credentials import parse_credentials, temporary_credentials_file, write_credentials_file

    old = os.umask(0)  # the most permissive umask: the mode must come from Relay, not the umask
    try:
        path = write_credentials_file(
            {"type": "authorized_user", "client_id": "c", "client_secret": "s" * 20, "refresh_token": "x" * 20},
            tmp_path / "c.json",
        )
        creds = parse_credentials(path.read_text(), str(path))
        with temporary_credentials_file(creds) as temp:
            assert stat.S_IMODE(temp.stat().st_mode) == 0o600
            assert stat.S_IMODE(temp.parent.stat().st_mode) == 0o700
        assert not temp.exists(), "the temporary credential file outlived its block"
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
