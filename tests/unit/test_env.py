"""Environment detection on faked Colab, Kaggle and local machines (no GPU, no torch needed)."""

from __future__ import annotations

import pytest

from runner.clock import FakeClock
from runner.env import detect_env, detect_platform, parse_nvidia_smi

T4_SMI = "Tesla T4, 15360, 15101, 7.5\n"
TWO_T4_SMI = "Tesla T4, 15360, 15101, 7.5\nTesla T4, 15360, 14000, 7.5\n"
A100_SMI = "NVIDIA A100-SXM4-40GB, 40960, 40000, 8.0\n"
MEMINFO = "MemTotal:       13290472 kB\nMemFree: 1 kB\n"


def fake_reader(uptime_s: float):
    files = {"/proc/uptime": f"{uptime_s} 100.0\n", "/proc/meminfo": MEMINFO}

    def read(path: str) -> str:
        if path not in files:
            raise OSError(path)
        return files[path]

    return read


def smi(text: str | None):
    def run(cmd):
        if text is None:
            raise FileNotFoundError("nvidia-smi")
        return text

    return run


def detect(environ, paths=(), smi_text=None, uptime_s=3600.0, tmp_path=None):
    clock = FakeClock()
    return detect_env(
        environ=environ,
        exists=lambda p: p in paths,
        read=fake_reader(uptime_s),
        run=smi(smi_text),
        clock=clock,
        process_start_wall=clock.wall() - 5,
        workdir=str(tmp_path) if tmp_path else "/tmp",
    ), clock


def test_colab_free_t4(tmp_path):
    env, clock = detect(
        {"COLAB_RELEASE_TAG": "release-colab_20261101"}, smi_text=T4_SMI, uptime_s=1800, tmp_path=tmp_path
    )
    assert env.platform == "colab" and env.tier == "colab-free"
    assert env.gpus[0].name == "Tesla T4" and env.gpus[0].compute_capability == "7.5"
    assert env.gpus[0].total_gib == pytest.approx(15.0) and not env.gpus[0].has_bf16
    assert env.session_start_wall == pytest.approx(clock.wall() - 1800)  # VM uptime, not process start
    assert env.session_limit_h and env.session_limit_h <= 12
    assert env.ram_gib == pytest.approx(12.7, abs=0.1)


def test_colab_detected_from_paths_alone_and_paid_gpu():
    env, _ = detect({}, paths={"/content/.config"}, smi_text=A100_SMI)
    assert env.platform == "colab" and env.tier == "colab-paid" and env.gpus[0].has_bf16


def test_kaggle_two_t4():
    env, clock = detect({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, smi_text=TWO_T4_SMI, uptime_s=600)
    assert env.platform == "kaggle" and len(env.gpus) == 2
    assert env.gpu_summary == "2× Tesla T4"
    assert env.session_start_wall == pytest.approx(clock.wall() - 600)
    assert env.session_limit_h == pytest.approx(12.0)


def test_kaggle_from_path():
    env, _ = detect({}, paths={"/kaggle/working"})
    assert env.platform == "kaggle"


def test_local_without_gpu_counts_from_process_start():
    env, clock = detect({}, smi_text=None, uptime_s=999_999)
    assert env.platform == "local" and env.tier == "local"
    assert env.gpus == () and env.gpu_summary == "CPU"
    assert env.session_start_wall == pytest.approx(clock.wall() - 5)
    assert env.session_limit_h is None


def test_kaggle_wins_over_the_colab_signals_its_image_carries():
    # Kaggle's image is Colab's (Kaggle/docker-python #1444): Colab's variables and paths may all be there
    colab_everything = {
        "COLAB_RELEASE_TAG": "r",
        "COLAB_GPU": "1",
        "COLAB_BACKEND_VERSION": "x",
        "TBE_RUNTIME_ADDR": "a",
    }
    for kaggle_var in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN"):
        environ = {**colab_everything, kaggle_var: "x"}
        assert detect_platform(environ, lambda p: p in ("/content/.config", "/var/colab")) == "kaggle", kaggle_var
    assert detect_platform(colab_everything, lambda p: False) == "colab"
    # a Colab notebook that made /kaggle/working for a Kaggle script is still Colab: variables come first
    assert detect_platform({"COLAB_RELEASE_TAG": "r"}, lambda p: p == "/kaggle/working") == "colab"


def test_garbage_smi():
    assert parse_nvidia_smi("garbage\n, , ,\nTesla T4, x, y, 7.5\n") == ()
