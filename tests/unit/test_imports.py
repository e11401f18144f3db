"""The architecture's import contracts (pyproject.toml [tool.importlinter], docs/architecture.md) hold."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_are_kept():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_the_contracts_catch_a_forbidden_import(tmp_path):
    """The check can fail: a copy of the package where the budget imports torch breaks the contract."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing")
    shutil.copytree(ROOT / "runner", tmp_path / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    budget = tmp_path / "runner" / "budget.py"
    budget.write_text(budget.read_text() + "\nimport torch  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([lint, "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "runner.budget -> torch" in out.stdout, out.stdout[-3000:]
