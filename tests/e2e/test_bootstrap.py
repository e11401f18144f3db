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


def fake_dist(python: Path, name: str, version: str) -> None:
    """A dummy distribution in the virtualenv (no real code), as the platform's image would hold its own build."""
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("platform-image\n")
    files = [f"{name}/__init__.py", f"{info.name}/METADATA", f"{info.name}/INSTALLER", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def fake_platform_torch(python: Path, version: str) -> None:
    fake_dist(python, "torch", version)


def installed_torch(python: Path, name: str = "torch") -> str:
    code = f"from importlib.metadata import version; print(version({name!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=clean_env()).stdout.strip()


def test_bootstrap_never_replaces_the_platforms_torch_and_says_what_it_installed(tmp_path, checkout):
    """Over a preinstalled image, the platform's torch (here a dummy `torch 2.4.1+platform` in the virtualenv)
    becomes a pip constraint: it survives the install, and bootstrap names what pip installed or upgraded."""
    python = notebook_like_venv(tmp_path / "venv")
    fake_platform_torch(python, "2.4.1+platform")
    fake_dist(python, "tenacity", "8.0.0")  # older than Relay's tenacity>=8.2: pip must upgrade it, and say so
    env = clean_env(PYTHON=str(python))
    done = subprocess.run(["bash", str(checkout / "bootstrap.sh")], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keeping the platform's torch==2.4.1+platform (pip constraints" in done.stdout, done.stdout
    assert installed_torch(python) == "2.4.1+platform"
    upgraded = installed_torch(python, "tenacity")
    assert upgraded != "8.0.0" and f"upgraded tenacity 8.0.0 → {upgraded}" in done.stdout, done.stdout


def test_bootstrap_stops_rather_than_replace_a_platform_torch_relay_cannot_use(tmp_path, checkout):
    """A platform torch older than Relay's torch>=2.1: pip would replace it; bootstrap refuses and says why."""
    python = notebook_like_venv(tmp_path / "venv")
    fake_platform_torch(python, "2.0.1+platform")
    env = clean_env(PYTHON=str(python))
    done = subprocess.run(["bash", str(checkout / "bootstrap.sh")], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "without replacing the platform's torch==2.0.1+platform" in done.stderr, done.stderr[-2000:]
    assert installed_torch(python) == "2.0.1+platform"
