"""bootstrap.sh in a fresh virtualenv: installs Relay, and a second run is fast and changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path):
    """A copy of the checkout, so the stamp file of the test never touches the real one."""
    dest = tmp_path / "relay"
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(".git", "relay-runs", "*.egg-info", "__pycache__", ".relay-bootstrap.stamp"),
    )
    return dest


def test_bootstrap_twice_in_a_fresh_virtualenv(tmp_path, checkout):
    venv = tmp_path / "venv"
    # system site packages: the notebook case, where torch and friends are already installed
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python)}
    first = subprocess.run(
        ["bash", str(checkout / "bootstrap.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "keeping the installed torch" in first.stdout
    assert "Next:" in first.stdout
    out = subprocess.run([str(python), "-m", "runner", "profiles"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "tiny" in out.stdout
    # the package was installed into the venv, from the copy
    where = subprocess.run(
        [str(python), "-c", "import runner; print(runner.__file__)"], capture_output=True, text=True, cwd=tmp_path
    )
    assert str(checkout) in where.stdout
    t0 = time.monotonic()
    second = subprocess.run(
        ["bash", str(checkout / "bootstrap.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert time.monotonic() - t0 < 30


def test_bootstrap_rejects_unknown_options(checkout):
    out = subprocess.run(["bash", str(checkout / "bootstrap.sh"), "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown option" in out.stderr
    out = subprocess.run(["bash", str(checkout / "bootstrap.sh"), "--run"], capture_output=True, text=True)
    assert out.returncode == 2 and "needs a profile" in out.stderr
