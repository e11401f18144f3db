"""Secrets reach a long-lived child without sitting in its /proc/PID/environ (runner.secretfile)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from runner import daemon
from runner.rundir import RunDir
from runner.secretfile import ENV_FILE, hand_over, take_over

TOKEN = "hf_secret_value_never_in_environ"
REPO = Path(__file__).resolve().parents[2]


def test_hand_over_moves_the_secrets_into_a_private_file(tmp_path):
    env = hand_over({"PATH": "/bin", "HF_TOKEN": TOKEN, "KAGGLE_KEY": "k"}, str(tmp_path))
    assert TOKEN not in "".join(env.values()) and "KAGGLE_KEY" not in env and env["PATH"] == "/bin"
    path = Path(env[ENV_FILE])
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o600
    environ = dict(env)
    take_over(environ)
    assert environ == {"PATH": "/bin", "HF_TOKEN": TOKEN, "KAGGLE_KEY": "k"} and not path.exists()
    assert hand_over({"PATH": "/bin"}) == {"PATH": "/bin"}  # nothing secret: no file


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux /proc")
def test_a_child_that_takes_over_has_the_secret_but_not_in_its_proc_environ(tmp_path):
    code = (
        "import os; from runner.cli import main; main(['profiles']);"  # the CLI's entry takes the secrets over
        f"print(os.environ['HF_TOKEN'] == {TOKEN!r}, {TOKEN.encode()!r} in open('/proc/self/environ', 'rb').read())"
    )
    env = hand_over({**os.environ, "PYTHONPATH": str(REPO), "HF_TOKEN": TOKEN}, str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["True", "False"], done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # the file is gone


def test_the_supervisor_hands_each_trainer_its_secrets_through_a_file(tmp_path, monkeypatch):
    seen = []

    class Proc:
        pid = 1

        def __init__(self, cmd, env, **_):
            seen.append(dict(env))

        def wait(self):
            return 0

    monkeypatch.setattr(daemon.subprocess, "Popen", Proc)
    rundir = RunDir(tmp_path)
    daemon.Supervisor(rundir, ["--profile", "tiny"], {"HF_TOKEN": TOKEN, "PATH": "/bin"})._run_trainer()
    assert "HF_TOKEN" not in seen[0] and TOKEN in Path(seen[0][ENV_FILE]).read_text()
