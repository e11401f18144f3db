"""The Colab and Kaggle notebooks run top to bottom in a real kernel: the one cell bootstraps Relay, trains
the run to its target in the background and shows the result; the status cell reads the run from storage.

They run here with the tiny profile on CPU, a local storage folder whose path has spaces (a
`gdrive://My Drive/relay` must stay one argument), and a copy of the checkout installed by the
cell's own bootstrap into a fresh virtualenv whose python runs the kernel (so the test never
re-points the real checkout's install). The cell reads its settings from the environment when
set: RELAY_PROFILE, RELAY_STORAGE, RELAY_DIR, RELAY_WORKDIR, RELAY_SET.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (the [test] extra)")
nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel (the [test] extra)")
pytest.importorskip("ipykernel", reason="pip install nbclient ipykernel (the [test] extra)")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CELL_TIMEOUT_S = 900  # the run cell installs Relay and trains the tiny profile on 2 CPU cores
KERNEL = "relay-venv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(checkout copy, kernelspec folder) shared by both notebooks; the second bootstrap finds Relay installed."""
    root = tmp_path_factory.mktemp("nb")
    checkout = root / "relay"
    ignore = shutil.ignore_patterns(".git", "relay-runs", "*.egg-info", "__pycache__", ".relay-bootstrap.stamp")
    shutil.copytree(REPO, checkout, ignore=ignore)
    venv = root / "venv"
    # system site packages: the notebook case, where torch, ipykernel and friends are already installed
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    spec = root / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return checkout, root / "jupyter"


def run_notebook(name: str, checkout: Path, jupyter: Path, tmp: Path, monkeypatch) -> list:
    env = {
        "RELAY_PROFILE": "tiny",
        "RELAY_STORAGE": str(tmp / "My Drive" / "relay runs"),
        "RELAY_DIR": str(checkout),
        "RELAY_WORKDIR": str(tmp / "work"),
        "RELAY_SET": " ".join([*FAST, "train.steps=6"]),
        "RELAY_HOME": str(tmp / "home"),
        "JUPYTER_PATH": str(jupyter),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel, and every process it starts, inherits these
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the venv's install of the checkout copy, nothing else
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failing cell
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        parts.append(out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", ""))
    return ANSI.sub("", "".join(parts)).replace("\r", "")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["colab", "kaggle"])
def test_notebook_trains_reports_and_shows_the_grid(name, installed, tmp_path, monkeypatch):
    checkout, jupyter = installed
    run, status = run_notebook(name, checkout, jupyter, tmp_path, monkeypatch)
    assert "exit 0: done" in text_of(run), text_of(run)[-3000:]
    assert "My Drive/relay runs/tiny/final/" in text_of(run)
    assert any("image/png" in out.get("data", {}) for out in run.outputs), text_of(run)[-3000:]
    assert "step 6 / 6" in text_of(status), text_of(status)


def test_notebooks_are_the_one_cell_and_the_readme_shows_it():
    readme = (REPO / "README.md").read_text()
    for name, profile in (("colab", "sdxl-naruto-t4"), ("kaggle", "sdxl-naruto-kaggle-2xt4")):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        cell = next(c.source for c in nb.cells if c.cell_type == "code")
        assert f'"{profile}"' in cell and "notebook.run(" in cell and "REPO_URL" in cell
        assert "YOUR-FORK" not in cell and "{STORAGE}" not in cell
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit without outputs"
        assert f'PROFILE = "{profile}"' in readme and "notebook.run(" in readme
    assert "YOUR-FORK" not in readme
