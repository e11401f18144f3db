"""The command line: help, profiles, and clear errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runner.cli import main


def relay(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_command():
    out = relay("--help")
    assert out.returncode == 0
    for command in ("train", "status", "plan", "sample", "export", "bench", "doctor", "profiles"):
        assert command in out.stdout
    assert "75" in out.stdout  # the exit code users must know


def test_train_help_shows_the_options():
    out = relay("train", "--help")
    assert out.returncode == 0
    for flag in ("--profile", "--storage", "--run", "--set", "--hours", "--take-over", "--force", "--release-gpu"):
        assert flag in out.stdout


def test_profiles_lists_shipped_profiles_with_descriptions(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "sdxl-naruto-t4", "sdxl-naruto-t4-512", "sdxl-naruto-kaggle-2xt4"):
        assert name in out
    assert "1024 px" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--profile", "nope"], ["no profile named 'nope'", "tiny"]),
        (["train", "--profile", "tiny", "--set", "lora.rank=0"], ["lora.rank", "out of range"]),
        (["train", "--profile", "tiny", "--set", "train.stepz=3"], ["train.stepz", "unknown key"]),
        (["train", "--profile", "tiny", "--storage", "s3://bucket/x"], ["s3://bucket/x"]),
        (["status", "--storage", "gdrive:"], ["gdrive:"]),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(tmp_path, args, words):
    out = relay(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    for word in words:
        assert word in out.stderr


def test_status_of_an_empty_storage_says_how_to_start(tmp_path):
    out = relay("status", "--storage", str(tmp_path))
    assert out.returncode == 2 and "no run found" in out.stderr and "relay train" in out.stderr


def test_doctor_gives_a_verdict_per_line(tmp_path):
    out = relay("doctor", "--storage", str(tmp_path / "store"), "--profile", "tiny")
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("platform", "torch", "diffusers", "peft", "storage", "profile", "verdict: ready"):
        assert line in out.stdout
    bad = relay("doctor", "--storage", str(tmp_path / "store"), "--profile", "nope")
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "no profile named" in bad.stdout


def test_bitsandbytes_cpu_advice_is_silenced_by_the_command_line(capsys):
    """Its CPU backend asks for `pip install kernels` on every import; Relay never uses bitsandbytes on a CPU."""
    import logging

    from runner.cli import main

    assert main(["profiles"]) == 0
    assert logging.getLogger("bitsandbytes.backends.cpu").getEffectiveLevel() == logging.ERROR
    logging.getLogger("bitsandbytes.backends.cpu").warning("Please make sure you already `pip install kernels`")
    assert "kernels" not in capsys.readouterr().err


def test_google_auths_project_id_warning_is_silenced():
    """The Drive API needs no Google Cloud project; the warning misled users reading a Drive failure."""
    import logging

    assert main(["profiles"]) == 0
    assert logging.getLogger("google.auth._default").getEffectiveLevel() == logging.ERROR


def test_train_on_colab_refuses_a_folder_on_the_vm_and_makes_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261120-060000_RC00")
    monkeypatch.delenv("RELAY_STORAGE_ON_VM", raising=False)
    storage = tmp_path / "content" / "relay"  # e.g. "/content/relay", or a "gdrive//…" typo made relative
    code = main(["train", "--profile", "tiny", "--storage", str(storage), "--workdir", str(tmp_path / "w")])
    assert code == 2 and "deleted with the VM" in capsys.readouterr().err
    assert not storage.exists()


def test_set_with_a_space_instead_of_equals_says_how_to_write_it(capsys):
    assert main(["train", "--profile", "tiny", "--set", "train.steps", "3"]) == 2
    assert "--set train.steps=3" in capsys.readouterr().err
    assert main(["plan", "--profile", "tiny", "--set", "train.steps", "--hours", "1"]) == 2
    assert "--set train.steps=VALUE" in capsys.readouterr().err


def test_the_bitsandbytes_cast_warning_is_filtered_for_the_whole_process():
    import warnings

    assert main(["profiles"]) == 0
    with warnings.catch_warnings(record=True) as seen:  # catch_warnings is what reset the show-once registry
        for _ in range(3):
            warnings.warn("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
                          UserWarning, stacklevel=1)  # fmt: skip
    assert seen == []
