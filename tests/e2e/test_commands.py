"""`relay plan`, `relay export` and `relay sample` on the tiny profile."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

FAST = ["--set", "train.steps=6", "--set", "data.generated_count=6", "--set", "data.validation_count=2"]


def relay(*args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runner", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_plan_of_a_new_run_trains_nothing(tmp_path):
    out = relay(
        "plan", "--profile", "sdxl-naruto-t4", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w")
    )
    assert out.returncode == 0, out.stderr
    assert "step 0 / 2000" in out.stdout
    assert "gradient checkpointing off" in out.stdout  # the fastest plan is tried first
    # no GPU here and nothing measured: per-GPU estimates from published figures, said to be estimates
    assert "estimate on one T4: about 3.37 s/step" in out.stdout  # 0.842 s × 4 micro-batches of 1024 px
    assert "estimate on one H200" in out.stdout and "estimates: the first session measures" in out.stdout
    assert not (tmp_path / "s" / "sdxl-naruto" / "run.json").exists()  # profile.run names the run


@pytest.mark.slow
def test_export_and_sample_from_the_newest_checkpoint(tmp_path):
    common = ["--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w"), *FAST]
    missing = relay("export", *common)
    assert missing.returncode == 2 and "no committed checkpoint" in missing.stderr
    assert relay("train", "--plain", *common).returncode == 0
    final = tmp_path / "s" / "tiny" / "final"
    trained = load_file(str(final / "pytorch_lora_weights.safetensors"))
    (final / "pytorch_lora_weights.safetensors").unlink()
    out = relay("export", *common)
    assert out.returncode == 0, out.stderr
    again = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert trained.keys() == again.keys() and all((trained[k] == again[k]).all() for k in trained)
    out = relay("sample", *common)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "tiny" / "samples" / "step-00000006" / "step-00000006.png").is_file()
    plan = relay("plan", *common)
    assert plan.returncode == 0 and "step 6 / 6" in plan.stdout


@pytest.mark.slow
@pytest.mark.exact_resume
def test_samples_during_training_leave_the_trained_weights_unchanged(tmp_path):
    def lora(name: str, *extra: str) -> dict:
        args = [
            "--profile",
            "tiny",
            "--plain",
            "--storage",
            str(tmp_path / name),
            "--workdir",
            str(tmp_path / f"w{name}"),
        ]
        assert relay("train", *args, *FAST, *extra).returncode == 0
        return load_file(str(tmp_path / name / "tiny" / "checkpoints" / "step-00000006" / "lora.safetensors"))

    plain, sampled = lora("a"), lora("b", "--set", "sample.every_steps=3")
    assert (tmp_path / "b" / "tiny" / "samples" / "step-00000003" / "step-00000003.png").is_file()
    assert all((plain[k] == sampled[k]).all() for k in plain)


def test_bench_runs_the_training_path_and_reports_json():
    out = relay("bench", "--model", "tiny", "--resolution", "64", "--steps", "2", "--rank", "4", "--json")
    assert out.returncode == 0, out.stderr
    import json

    report = json.loads(out.stdout)
    assert report["model"] == "tiny" and report["resolution"] == 64 and len(report["step_s_all"]) == 2
    assert report["trainable_params"] > 0 and report["step_s_median"] > 0
    assert report["checkpoint_save_s"] >= 0 and report["checkpoint_write_s"] > 0  # the copy of a tiny LoRA: ~0
    assert report["images_per_s"] == pytest.approx(1 / report["step_s_median"], rel=0.01)
    # the resume is timed in a fresh process, from its start to the end of its first step
    assert report["notes"] == [] and 0 < report["import_s"] < report["resume_to_first_step_s"]
    assert 0 < report["resume_load_s"] < report["resume_to_first_step_s"]
