"""bootstrap.sh in a fresh virtualenv: installs Relay, and a second run is fast and changes nothing."""

from __future__ import annotations

import importlib.util
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


def notebook_like_venv(venv: Path) -> Path:
    """A fresh virtualenv that sees the torch these tests run with: the notebook case, where torch and
    friends are already installed. Its python.

    Made from the base interpreter (sys._base_executable: inside a virtualenv, sys.executable's system site
    packages are the base's, not the virtualenv's). Where torch is installed in a virtualenv rather than in
    the base (the README's path), the new one gets a .pth line naming the folder that holds torch."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=clean_env()).returncode != 0:
        torch = importlib.util.find_spec("torch")  # where it is, without importing it
        assert torch is not None and torch.origin, "the tests need torch installed"
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        (Path(site) / "installed-torch.pth").write_text(str(Path(torch.origin).resolve().parents[1]) + "\n")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH: a user's shell has none, and it would shadow the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_bootstrap_twice_in_a_fresh_virtualenv(tmp_path, checkout):
    python = notebook_like_venv(tmp_path / "venv")
    env = clean_env(PYTHON=str(python))
    first = subprocess.run(
        ["bash", str(checkout / "bootstrap.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "keeping the installed torch" in first.stdout
    assert "Next:" not in first.stdout  # a terminal's hint; a notebook cell's output is no terminal
    out = subprocess.run([str(python), "-m", "runner", "profiles"], capture_output=True, text=True, cwd=tmp_path,
                         env=clean_env())  # fmt: skip
    assert out.returncode == 0 and "tiny" in out.stdout
    # the package was installed into the venv, from the copy
    where = subprocess.run(
        [str(python), "-c", "import runner; print(runner.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
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
