"""runner.notebook's decisions: which platform, headless or not, the trainer's arguments and environment."""

from __future__ import annotations

import pytest

from runner import notebook

COLAB = {"COLAB_RELEASE_TAG": "release-colab_20261120-060000_RC00"}
KAGGLE = {**COLAB, "KAGGLE_KERNEL_RUN_TYPE": "Interactive", "KAGGLE_URL_BASE": "https://www.kaggle.com"}


def test_kaggle_runs_on_colabs_image_and_is_still_kaggle():
    assert notebook.platform_of(KAGGLE) == "kaggle"
    assert notebook.platform_of(COLAB) == "colab"
    assert notebook.platform_of({}) == "local"


def test_save_and_run_all_is_headless():
    assert notebook.is_headless({**KAGGLE, "KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    assert notebook.is_headless({})  # not in a kernel (this test process)


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

    monkeypatch.setattr(notebook, "read_secret", read_secret)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return found, asked


def test_secrets_reach_the_trainers_environment(secrets):
    found, asked = secrets
    found[("kaggle", "RELAY_GDRIVE_CREDENTIALS")] = '{"refresh_token": "r"}'
    found[("kaggle", "HF_TOKEN")] = "hf_x"
    env = notebook.trainer_env("kaggle", "gdrive://abc", {"PATH": "/bin"}, sign_in=pytest.fail)
    assert env == {"PATH": "/bin", "RELAY_GDRIVE_CREDENTIALS": '{"refresh_token": "r"}', "HF_TOKEN": "hf_x"}


def test_local_storage_needs_no_drive_secret_and_a_set_variable_wins(secrets):
    _, asked = secrets
    env = notebook.trainer_env("colab", "/tmp/runs", {"HF_TOKEN": "mine"}, sign_in=pytest.fail)
    assert env == {"HF_TOKEN": "mine"} and asked == []


def test_colab_without_a_drive_secret_signs_in_and_uses_application_default(secrets):
    signed = []
    env = notebook.trainer_env("colab", "gdrive://My Drive/relay", {}, sign_in=lambda: signed.append(1))
    assert signed == [1] and env["RELAY_GDRIVE_CREDENTIALS"] == notebook.ADC
    env = notebook.trainer_env("kaggle", "gdrive://My Drive/relay", {}, sign_in=pytest.fail)
    assert "RELAY_GDRIVE_CREDENTIALS" not in env  # Kaggle has no sign-in: the trainer says what is missing


@pytest.mark.parametrize("storage", ["drive", "/content/drive", "/content/drive/MyDrive/relay"])
def test_the_colab_mount_is_recognised(storage):
    assert notebook.uses_mount(storage)
    assert not notebook.uses_mount("/content/drives")


def test_an_error_exit_raises_with_its_code_and_the_trainers_last_lines(tmp_path):
    (tmp_path / "trainer.log").write_text("relay: error: profile tiny: bad value\n")
    outcome = notebook.Outcome("tiny", "/s", 2, str(tmp_path), "trainer ended: bad input")
    with pytest.raises(notebook.NotebookRunError, match="bad value") as err:
        notebook._finish(outcome, {}, None, False, "/s")
    assert err.value.exit_code == 2
    again = notebook.Outcome("tiny", "/s", 75, str(tmp_path))
    assert notebook._finish(again, {}, None, True, "/s") is again  # session over: no error, nothing released
