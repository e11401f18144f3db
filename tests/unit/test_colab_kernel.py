"""The kernel side on the Colab stand-in (tests/platforms/colab, after googlecolab/colabtools at 3c07d776):
the Drive mount's end of a run, and secrets that do not arrive in time. The calls run as in a notebook's
kernel (IPython's shell has a kernel); the whole cell through a real kernel is tests/e2e/test_notebook_cell.py."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from runner import colabkernel, notebook, notebookenv
from runner.errors import EXIT_OK, UsageError
from tests.platforms import apply, colab_t4


@pytest.fixture
def colab(tmp_path, monkeypatch):
    """Colab's variables and google.colab stand-in, a VM root with /var/colab/hostname, a frontend, a kernel."""
    (tmp_path / "var" / "colab").mkdir(parents=True)
    (tmp_path / "var" / "colab" / "hostname").write_text("colab-standin\n")
    frontend = tmp_path / "frontend.json"
    frontend.write_text(json.dumps({"secrets": {"HF_TOKEN": "hf_x"}}))
    apply(monkeypatch, colab_t4.ENV, DATALAB_ROOT=str(tmp_path), COLAB_STANDIN_FRONTEND=str(frontend),
          COLAB_STANDIN_CALLS=str(tmp_path / "calls.jsonl"))  # fmt: skip
    for name in [m for m in sys.modules if m == "google.colab" or m.startswith("google.colab.")]:
        monkeypatch.delitem(sys.modules, name)
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: SimpleNamespace(kernel=object()))
    monkeypatch.setattr(colabkernel, "_UNMOUNTED", set())
    yield tmp_path, frontend
    for name in [m for m in sys.modules if m == "google.colab" or m.startswith("google.colab.")]:
        sys.modules.pop(name, None)


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line)["call"] for line in path.read_text().splitlines()] if path.exists() else []


def test_drive_storage_is_checked_complete_before_the_unmount_then_flushed_then_released(colab, monkeypatch):
    """On `drive` storage the run lives on the mount: completion (relay status) must be read before
    flush_and_unmount takes the mount away, or release_gpu never ends the runtime."""
    tmp, _ = colab
    mount_point = str(tmp / "mnt")
    monkeypatch.setattr(notebookenv, "MOUNT_POINT", mount_point)
    notebookenv.mount_drive(mount_point)
    seen = []

    def is_complete(run, storage, env):
        seen.append((tmp / "mnt" / "MyDrive").is_dir())  # the mount is still there
        return True

    monkeypatch.setattr(notebook, "is_complete", is_complete)
    monkeypatch.setattr(notebook, "show_result", lambda *a: seen.append("shown"))
    outcome = notebook.Outcome("sdxl-naruto", "drive", EXIT_OK, str(tmp))
    notebook._finish(outcome, dict(colab_t4.ENV.environ), None, True, "drive")
    assert seen == [True, "shown"]
    assert calls(tmp)[-3:] == ["drive.flush_and_unmount", "runtime.unassign", "request:cell_javascript_eval"]
    assert not (tmp / "mnt" / "MyDrive").exists()  # unmounted


def test_after_the_flush_a_second_mount_fails_as_on_colab_and_relay_says_what_to_do(colab, capsys):
    """colabtools #4773: a mount after flush_and_unmount raises `ValueError: mount failed`."""
    tmp, _ = colab
    from google.colab import drive

    mount_point = str(tmp / "mnt")
    drive.mount(mount_point)
    drive.mount(mount_point)  # `My Drive` (colabtools' test) is not there: a second mount remounts
    assert "Drive already mounted" not in capsys.readouterr().out
    (tmp / "old").mkdir()
    (tmp / "old" / "My Drive").mkdir()
    drive.mount(str(tmp / "old"))
    assert "Drive already mounted" in capsys.readouterr().out

    notebookenv.flush_drive(mount_point)
    with pytest.raises(ValueError, match="mount failed"):
        drive.mount(mount_point)
    with pytest.raises(UsageError, match="cannot be mounted again in this runtime") as err:
        notebookenv.mount_drive(mount_point)
    assert err.value.exit_code == 2 and "Disconnect and delete runtime" in str(err.value.hint)


@pytest.mark.parametrize("knob", ["timeouts", "errors"])
def test_a_secret_that_times_out_is_asked_for_once_more_saying_so(colab, capsys, knob):
    """colabtools userdata.get: 10 s for the frontend's answer, then TimeoutException; an error reply is a
    MessageError. Relay asks a second time and says so; a second failure is said as well."""
    _, frontend = colab
    frontend.write_text(json.dumps({"secrets": {"HF_TOKEN": "hf_x"}, knob: {"HF_TOKEN": 1}}))
    assert notebookenv.read_secret("colab", "HF_TOKEN") == "hf_x"
    said = capsys.readouterr().out
    assert "did not hand over the secret HF_TOKEN" in said and "asking once more" in said and "hf_x" not in said

    frontend.write_text(json.dumps({"secrets": {"HF_TOKEN": "hf_x"}, knob: {"HF_TOKEN": 2}}))
    assert notebookenv.read_secret("colab", "HF_TOKEN") is None
    assert "twice" in capsys.readouterr().out


def test_a_missing_secret_is_asked_for_once(colab, tmp_path):
    tmp, _ = colab
    assert notebookenv.read_secret("colab", "RELAY_GDRIVE_CREDENTIALS") is None
    assert calls(tmp).count("request:GetSecret") == 1


def test_the_chains_client_is_installed_where_the_chain_is_on_and_only_when_missing(monkeypatch, capsys):
    import importlib.util
    import subprocess

    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or SimpleNamespace(returncode=0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    notebook._ensure_chain_client({})
    assert ran and ran[0][1:4] == ["-m", "pip", "install"] and "kagglesdk>=0.1" in ran[0]
    assert "installing kagglesdk" in capsys.readouterr().out
    ran.clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    notebook._ensure_chain_client({})
    assert ran == []
