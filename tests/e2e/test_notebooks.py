"""The Colab and Kaggle notebooks run top to bottom: bootstrap, train to the target, status, the sample grid.

They run here with the tiny profile on CPU, a local storage folder and a copy of the checkout
installed into a fresh virtualenv (so the test never re-points the real checkout's install),
steered by the environment variables the notebooks read: RELAY_PROFILE, RELAY_STORAGE,
RELAY_SKIP_CLONE, RELAY_DIR, RELAY_EXTRA_ARGS, RELAY_WORKDIR.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (the [test] extra)")
nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel (the [test] extra)")
pytest.importorskip("ipykernel", reason="pip install ipykernel (the [test] extra)")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CELL_TIMEOUT_S = 900  # the run cell installs Relay and trains the tiny profile on 2 CPU cores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(checkout copy, virtualenv) shared by both notebooks; the second bootstrap finds Relay installed."""
    root = tmp_path_factory.mktemp("nb")
    checkout = root / "relay"
    ignore = shutil.ignore_patterns(".git", "relay-runs", "*.egg-info", "__pycache__", ".relay-bootstrap.stamp")
    shutil.copytree(REPO, checkout, ignore=ignore)
    venv = root / "venv"
    # system site packages: the notebook case, where torch and friends are already installed
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    return checkout, venv


def run_notebook(name: str, checkout: Path, venv: Path, tmp: Path, monkeypatch) -> list:
    storage, workdir = tmp / "storage", tmp / "work"
    env = {
        "RELAY_PROFILE": "tiny",
        "RELAY_STORAGE": str(storage),
        "RELAY_SKIP_CLONE": "1",
        "RELAY_DIR": str(checkout),
        "RELAY_EXTRA_ARGS": "",
        "RELAY_WORKDIR": str(workdir),
        "PYTHON": str(venv / "bin" / "python"),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",  # `relay` is the venv's
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel, and every `!` command in it, inherits these
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failing cell
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    """A cell's printed text without colour codes (the kernel sets FORCE_COLOR for `!` commands)."""
    text = "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")
    return ANSI.sub("", text).replace("\r", "")


@pytest.mark.parametrize("name", ["colab", "kaggle"])
def test_notebook_trains_reports_and_shows_the_grid(name, installed, tmp_path, monkeypatch):
    checkout, venv = installed
    settings, _credentials, run, status, grid = run_notebook(name, checkout, venv, tmp_path, monkeypatch)
    assert f"storage {tmp_path / 'storage'}" in text_of(settings)
    assert "relay exited with 0: done" in text_of(run), text_of(run)[-3000:]
    assert "step 40 / 40" in text_of(status), text_of(status)
    assert any("image/png" in out.get("data", {}) for out in grid.outputs), text_of(grid)


def test_notebooks_are_valid_v4_with_the_documented_one_liner():
    for name, profile in (("colab", "sdxl-naruto-t4"), ("kaggle", "sdxl-naruto-kaggle-2xt4")):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        source = "\n".join(cell.source for cell in nb.cells)
        assert f"bash relay/bootstrap.sh --run {profile} --storage gdrive://FOLDER_ID" in source
        assert "RELAY_GDRIVE_CREDENTIALS" in source
        assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit without outputs"
