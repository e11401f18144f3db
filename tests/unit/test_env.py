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


def test_an_uptime_longer_than_the_platform_allows_is_not_believed(monkeypatch):
    """A reused or pooled VM: /proc/uptime says 40 h on Kaggle (12 h sessions). The session is counted from
    its earliest process (this one's ancestors, from /proc/PID/stat) minus a margin, and the plan says so."""
    import os

    from runner.env import UNTRUSTED_UPTIME_MARGIN_S

    clock, hz, uptime = FakeClock(), os.sysconf("SC_CLK_TCK"), 40 * 3600.0
    boot = clock.wall() - uptime
    kernel_started = clock.wall() - 2 * 3600  # the notebook's kernel, two hours ago
    stat = "{pid} (python3) S {ppid} 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {ticks} 0 0"
    me, kernel = os.getpid(), 4242
    files = {
        "/proc/uptime": f"{uptime} 1.0\n", "/proc/meminfo": MEMINFO,
        f"/proc/{me}/stat": stat.format(pid=me, ppid=kernel, ticks=int((clock.wall() - 60 - boot) * hz)),
        f"/proc/{kernel}/stat": stat.format(pid=kernel, ppid=1, ticks=int((kernel_started - boot) * hz)),
    }  # fmt: skip
    env = detect_env(environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, exists=lambda p: False, read=files.__getitem__,
                     run=smi(TWO_T4_SMI), clock=clock, process_start_wall=clock.wall() - 5, workdir="/tmp")  # fmt: skip
    assert env.session_start_wall == pytest.approx(kernel_started - UNTRUSTED_UPTIME_MARGIN_S, abs=1)
    assert any("reused or pooled VM" in n and "40.0 h" in n for n in env.notes), env.notes
    believed, _ = detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, smi_text=TWO_T4_SMI, uptime_s=11 * 3600)
    assert believed.notes == ()  # an uptime within the limit is the session's age


def test_a_known_end_of_the_session_shortens_the_limit_and_is_named(monkeypatch):
    """The Kaggle cell passes the end the account's GPU quota allows (RELAY_SESSION_END_WALL): the limit is
    min(the platform's 12 h, that end), and says which figure it is."""
    from runner.env import SESSION_END_ENV, SESSION_END_SOURCE_ENV

    clock = FakeClock()
    end = clock.wall() + 5 * 3600  # 5 h of quota left when the session started, 10 min ago
    environ = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", SESSION_END_ENV: str(end),
               SESSION_END_SOURCE_ENV: "the Kaggle GPU quota (GetAcceleratorQuotaStatistics: 5.0 h left)"}  # fmt: skip
    env, clock = detect(environ, smi_text=TWO_T4_SMI, uptime_s=600)
    assert env.session_limit_h == pytest.approx((end - env.session_start_wall) / 3600)
    assert env.limit_source.startswith("the Kaggle GPU quota") and "less than the platform's 12 h" in env.notes[-1]
    plenty, _ = detect({**environ, SESSION_END_ENV: str(clock.wall() + 30 * 3600)}, smi_text=TWO_T4_SMI)
    assert plenty.session_limit_h == 12.0 and plenty.limit_source == "kaggle's session limit"
