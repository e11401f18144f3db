"""runner.notebook's decisions: which platform, headless or not, the trainer's arguments and environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runner import notebook, notebookenv
from runner.errors import UsageError

COLAB = {"COLAB_RELEASE_TAG": "release-colab_20261120-060000_RC00"}
KAGGLE = {**COLAB, "KAGGLE_KERNEL_RUN_TYPE": "Interactive", "KAGGLE_URL_BASE": "https://www.kaggle.com"}


def test_kaggle_runs_on_colabs_image_and_is_still_kaggle():
    assert notebookenv.platform_of(KAGGLE) == "kaggle"
    assert notebookenv.platform_of(COLAB) == "colab"
    assert notebookenv.platform_of({}) == "local"


def test_save_and_run_all_is_headless():
    assert notebookenv.is_headless({**KAGGLE, "KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    assert notebookenv.is_headless({})  # not in a kernel (this test process)


def test_a_storage_path_with_spaces_is_one_argument():
    args = notebook.train_args("tiny", "gdrive://My Drive/relay", overrides=["train.steps=3"], hours=2.5)
    assert args[args.index("--storage") + 1] == "gdrive://My Drive/relay"
    assert args[-2:] == ["--set", "train.steps=3"] and "2.5" in args


@pytest.fixture
def secrets(monkeypatch):
    found: dict[tuple[str, str], str] = {}
    asked: list[tuple[str, str]] = []

    def read_secret(platform, name):
        asked.append((platform, name))
        return found.get((platform, name))

    monkeypatch.setattr(notebookenv, "read_secret", read_secret)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return found, asked


def test_secrets_reach_the_trainers_environment(secrets):
    found, asked = secrets
    found[("kaggle", "RELAY_GDRIVE_CREDENTIALS")] = '{"refresh_token": "r"}'
    found[("kaggle", "HF_TOKEN")] = "hf_x"
    env = notebookenv.trainer_env("kaggle", "gdrive://abc", {"PATH": "/bin"}, sign_in=pytest.fail)
    assert env == {"PATH": "/bin", "RELAY_GDRIVE_CREDENTIALS": '{"refresh_token": "r"}', "HF_TOKEN": "hf_x"}


def test_local_storage_needs_no_drive_secret_and_a_set_variable_wins(secrets):
    _, asked = secrets
    env = notebookenv.trainer_env("colab", "/tmp/runs", {"HF_TOKEN": "mine"}, sign_in=pytest.fail)
    assert env == {"HF_TOKEN": "mine"} and asked == []


def test_colab_without_a_drive_secret_signs_in_and_uses_application_default(secrets):
    signed = []
    env = notebookenv.trainer_env("colab", "gdrive://My Drive/relay", {}, sign_in=lambda: signed.append(1))
    assert signed == [1] and env["RELAY_GDRIVE_CREDENTIALS"] == notebookenv.ADC
    env = notebookenv.trainer_env("kaggle", "gdrive://My Drive/relay", {}, sign_in=pytest.fail)
    assert "RELAY_GDRIVE_CREDENTIALS" not in env  # Kaggle has no sign-in: the trainer says what is missing


@pytest.mark.parametrize("storage", ["drive", "/content/drive", "/content/drive/MyDrive/relay"])
def test_the_colab_mount_is_recognised(storage):
    assert notebookenv.uses_mount(storage)
    assert not notebookenv.uses_mount("/content/drives")


def test_an_error_exit_raises_with_its_code_and_the_trainers_last_lines(tmp_path):
    (tmp_path / "trainer.log").write_text("relay: error: profile tiny: bad value\n")
    outcome = notebook.Outcome("tiny", "/s", 2, str(tmp_path), "trainer ended: bad input")
    with pytest.raises(notebook.NotebookRunError, match="bad value") as err:
        notebook._finish(outcome, {}, None, False, "/s")
    assert err.value.exit_code == 2
    again = notebook.Outcome("tiny", "/s", 75, str(tmp_path))
    assert notebook._finish(again, {}, None, True, "/s") is again  # session over: no error, nothing released


@pytest.fixture
def colab_runtime(monkeypatch):
    """google.colab.runtime as colabtools has it, recording unassign() instead of ending anything."""
    released: list[int] = []
    google, colab, runtime = (type(sys)(n) for n in ("google", "google.colab", "google.colab.runtime"))
    runtime.unassign = lambda: released.append(1)
    google.colab, colab.runtime = colab, runtime
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(notebook, "show_result", lambda *a: None)
    monkeypatch.setattr(notebook, "is_complete", lambda *a: True)
    return released


def test_release_gpu_never_ends_a_runtime_whose_storage_is_on_the_vm(colab_runtime, capsys):
    done = notebook.Outcome("tiny", "/content/runs", 0, "/tmp/x")
    notebook._finish(done, COLAB, None, True, "/content/runs")
    assert colab_runtime == [] and "keeping the runtime" in capsys.readouterr().out
    remote = notebook.Outcome("tiny", "hf://me/runs", 0, "/tmp/x")
    notebook._finish(remote, COLAB, None, True, "hf://me/runs")
    assert colab_runtime == [1]  # storage that outlives the VM: the GPU is released


def test_a_vm_folder_on_colab_is_refused_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(notebook.os, "environ", {**COLAB, "RELAY_HOME": str(tmp_path / "home")})
    monkeypatch.setattr(notebook.daemon, "start", pytest.fail)
    with pytest.raises(UsageError, match="deleted with the VM"):
        notebook.run(profile="tiny", storage=str(tmp_path / "runs"), release_gpu=True)
    assert not (tmp_path / "runs").exists()


def test_rerunning_the_cell_of_a_finished_run_shows_it_and_keeps_the_runtime(colab_runtime, monkeypatch, tmp_path,
                                                                             capsys):  # fmt: skip
    monkeypatch.setattr(notebook.os, "environ", {**COLAB, "RELAY_HOME": str(tmp_path / "home")})
    monkeypatch.setattr(notebook.daemon, "start", pytest.fail)
    outcome = notebook.run(profile="tiny", storage="hf://me/runs", release_gpu=True)
    assert outcome.exit_code == 0 and colab_runtime == []
    assert "keeping the runtime" in capsys.readouterr().out


def test_release_gpu_on_kaggle_says_why_it_is_ignored(colab_runtime, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(notebook.os, "environ", {**KAGGLE, "RELAY_HOME": str(tmp_path / "home")})
    notebook.run(profile="tiny", storage="hf://me/runs", release_gpu=True)
    assert "release_gpu=True is ignored on Kaggle" in capsys.readouterr().out and colab_runtime == []


def test_images_in_a_drive_folder_get_the_drive_mounted_on_colab(colab_runtime, monkeypatch, tmp_path):
    mounted = []
    monkeypatch.setattr(notebook, "mount_drive", lambda: mounted.append(1))
    monkeypatch.setattr(notebook.os, "environ", {**COLAB, "RELAY_HOME": str(tmp_path / "home")})
    notebook.run(profile="tiny", storage="hf://me/runs", overrides=["data.source=/content/drive/MyDrive/pics"])
    assert mounted == [1]
    notebook.run(profile="tiny", storage="hf://me/runs")
    assert mounted == [1]  # generated images: no Drive


def test_a_secret_the_user_denied_is_said_to_be_unused(monkeypatch, capsys):
    class NotebookAccessError(Exception):  # colabtools google/colab/userdata.py: exists, access not granted
        pass

    def get(key):
        raise NotebookAccessError(f"Notebook does not have access to secret {key}")

    google, colab, userdata = (type(sys)(n) for n in ("google", "google.colab", "google.colab.userdata"))
    userdata.get, userdata.NotebookAccessError = get, NotebookAccessError
    google.colab, colab.userdata = colab, userdata
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.userdata", userdata)):
        monkeypatch.setitem(sys.modules, name, module)
    env = notebookenv.trainer_env("colab", "hf://me/runs", {}, sign_in=pytest.fail)
    assert "HF_TOKEN" not in env
    assert "secret HF_TOKEN was not used: this notebook was denied access" in capsys.readouterr().out


def test_the_cells_dashboard_has_a_plain_text_version(capsys):
    from runner import events as ev

    view = notebook.CellView()
    shown = []
    view.handle = type("Handle", (), {"update": lambda self, data, raw: shown.append(data)})()
    view.on_event(ev.SessionStarted(run="tiny", platform="colab", gpu="T4", step=0, target=40, deadline_s=None))
    view.draw()
    assert "tiny" in shown[-1]["text/plain"] and "<pre" in shown[-1]["text/html"]  # plain text: not empty


def test_the_result_shows_each_image_once(tmp_path, monkeypatch, capsys):
    import IPython.display

    for copy in ("staging/final", "final", "store/final"):  # the workdir keeps the final folder more than once
        (tmp_path / "work" / "tiny" / copy).mkdir(parents=True)
        for name in ("samples.png", "loss.png"):
            (tmp_path / "work" / "tiny" / copy / name).write_bytes(b"png")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    monkeypatch.setattr(IPython.display, "Image", lambda filename: Path(filename).name)
    notebook.show_result("tiny", "hf://me/runs", str(tmp_path / "work"))
    assert sorted(shown) == ["loss.png", "samples.png"]


SECRETS = {
    "HF_TOKEN": "hf_SECRET_hub_token",
    "RELAY_GDRIVE_CREDENTIALS": '{"refresh_token": "SECRET_drive_token"}',
    "KAGGLE_API_TOKEN": "SECRET_kaggle_api_token",
    "KAGGLE_USERNAME": "someone",
    "KAGGLE_KEY": "SECRET_kaggle_key",
}
KAGGLE_SECRETS = {"KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"}


@pytest.mark.parametrize("chain", [False, True])
def test_no_secret_reaches_a_command_line_the_cells_output_or_the_supervisors_environment(chain, monkeypatch,
                                                                                         tmp_path, capsys):  # fmt: skip
    """The cell's children (status, the chain, the supervisor) get secrets through their environment or a 0600
    file, never their argv (readable by every process on the VM); the Kaggle key is read only for the chain."""
    import os
    import stat
    import subprocess

    asked: list[str] = []
    monkeypatch.setattr(notebookenv, "read_secret", lambda platform, name: asked.append(name) or SECRETS.get(name))
    monkeypatch.setattr(notebook.os, "environ", {**KAGGLE, "RELAY_HOME": str(tmp_path / "home")})
    commands: list[list[str]] = []
    supervisor_envs: list[dict] = []

    def fake_run(args, **kwargs):  # relay status (not complete) and runner.chain
        commands.append([str(a) for a in args])
        return subprocess.CompletedProcess(args, 1, "", "")

    def fake_popen(args, **kwargs):  # the detached supervisor
        commands.append([str(a) for a in args])
        supervisor_envs.append(dict(kwargs["env"]))
        return type("Proc", (), {"pid": 4242})()

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    overrides = ['session.chain="kaggle"', 'session.chain_notebook="someone/relay"'] if chain else []
    notebook.run(profile="tiny", storage="gdrive://My Drive/relay", overrides=overrides, follow=False)

    printed = capsys.readouterr()
    values = [v for k, v in SECRETS.items() if k != "KAGGLE_USERNAME"]
    assert commands and len(supervisor_envs) == 1
    assert any("runner.chain" in c for c in commands) == chain
    for value in values:
        assert not any(value in arg for command in commands for arg in command)
        assert value not in printed.out + printed.err
        assert value not in json_of(supervisor_envs[0])
    assert bool(KAGGLE_SECRETS & set(asked)) == chain  # no Kaggle key is even read without the chain
    handed = supervisor_envs[0]["RELAY_SECRETS_FILE"]  # the supervisor's secrets wait in a 0600 file
    assert stat.S_IMODE(os.stat(handed).st_mode) == 0o600 and "hf_SECRET_hub_token" in Path(handed).read_text()


def json_of(env: dict) -> str:
    import json

    return json.dumps(env)
