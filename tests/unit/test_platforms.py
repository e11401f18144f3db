"""Relay on each platform's real variable set (tests/platforms): detection, session limit, the
Kaggle weekly-quota record, the GPU capability check and Kaggle's secrets service."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from runner import budget, quota
from runner.clock import FakeClock
from runner.env import (
    UnsupportedGpu,
    capability_runs,
    detect_env,
    detect_platform,
    gpu_unsupported_reason,
    parse_nvidia_smi,
    query_gpus,
)
from runner.errors import EXIT_USAGE
from runner.train.gpu_arch import ensure_gpus_supported
from tests.platforms import all_platforms, apply, child_env, colab_t4, kaggle_p100, kaggle_t4x2, local
from tests.platforms.kaggle_service import KaggleSecretsService
from tests.platforms.torch_builds import CU126, CU128, CU130

PLATFORMS = all_platforms()
MEMINFO = "MemTotal:       32853512 kB\n"


def detect(plat, tmp_path):
    clock = FakeClock()
    files = {"/proc/uptime": "600.0 100.0\n", "/proc/meminfo": MEMINFO}
    return detect_env(
        environ=plat.environ, exists=plat.exists, read=files.__getitem__, run=plat.run, clock=clock,
        process_start_wall=clock.wall(), workdir=str(tmp_path),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(PLATFORMS))
def test_each_platform_is_recognised_from_its_real_variables(name, tmp_path):
    plat = PLATFORMS[name]
    env = detect(plat, tmp_path)
    assert env.platform == plat.platform
    assert detect_platform(plat.environ, lambda p: False) == plat.platform  # variables alone suffice (child processes)
    assert len(env.gpus) == len(parse_nvidia_smi(plat.nvidia_smi))


def test_kaggle_session_gets_kaggle_limit_and_quota_record(tmp_path):
    env = detect(kaggle_t4x2.ENV, tmp_path)
    assert env.platform == "kaggle" and env.tier == "kaggle"
    assert env.session_limit_h == budget.default_limit_h("kaggle") == 12.0
    assert env.gpu_summary == "2× Tesla T4"
    # the sessions it records count against Kaggle's weekly quota; a "colab" record would not
    record = {"platform": env.platform, "start_wall": 0.0, "end_wall": 3600.0 * 10, "gpu_count": len(env.gpus)}
    left = quota.kaggle_quota_left_h([record], 3600.0 * 11, account="")
    assert left == pytest.approx(quota.KAGGLE_WEEKLY_GPU_H - 10.0)  # session hours, as the quota API counts them
    assert "Kaggle quota" in (quota.quota_warning(left, steps_left=1000, step_s=100.0, gpu_count=2) or "")
    colab = detect(colab_t4.ENV, tmp_path)
    assert colab.platform == "colab" and colab.session_limit_h != env.session_limit_h


def test_subprocess_sees_the_platform(tmp_path):
    code = "from runner.env import detect_platform, query_gpus; import os; print(detect_platform(os.environ, lambda p: False), len(query_gpus()))"
    for plat, gpus in ((kaggle_t4x2.ENV, 2), (colab_t4.ENV, 1), (local.ENV, 0)):
        done = subprocess.run(
            [sys.executable, "-c", code], env=child_env(plat), capture_output=True, text=True, timeout=60
        )
        assert done.stdout.split() == [plat.platform, str(gpus)], done.stderr


def test_relay_plan_in_a_kaggle_child_process_counts_kaggle_limits(tmp_path):
    env = child_env(kaggle_t4x2.ENV, RELAY_WORKDIR=str(tmp_path / "work"))
    done = subprocess.run([sys.executable, "-m", "runner", "plan", "--profile", "tiny", "--storage", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "platform: kaggle (kaggle)" in done.stdout and "2× Tesla T4" in done.stdout
    said = done.stdout.split("this session: ")[1].split(" left")[0]  # "11 h 02 min", "45 min", "12 h"
    hours, minutes = re.fullmatch(r"(?:(\d+) h)? ?(?:(\d+) min)?(?: ?\d+ s)?", said).groups()
    hours_left = int(hours or 0) + int(minutes or 0) / 60
    expected = 12.0 - float(open("/proc/uptime").read().split()[0]) / 3600  # Kaggle's 12 h from the VM's boot
    if expected > 0.1:
        assert abs(hours_left - expected) < 0.05, (hours_left, expected)  # not Colab's 11.5 h


# ---------------------------------------------------------------- GPU capability


def test_capability_rules_cubin_ptx_and_arch_specific():
    assert not capability_runs("6.0", CU128) and capability_runs("6.0", CU126)
    assert capability_runs("7.5", CU128) and capability_runs("8.9", CU128)  # sm_86 cubin runs on 8.9
    assert not capability_runs("7.5", ("sm_80", "sm_90"))  # a cubin never runs on an older major
    assert not capability_runs("8.0", ("sm_75",))  # nor on a newer major
    assert capability_runs("12.1", CU130) and capability_runs("13.0", ("compute_120",))  # PTX JITs forward
    assert not capability_runs("7.5", ("compute_80",))  # but never backward
    assert capability_runs("9.0", ("sm_90a",)) and not capability_runs("10.0", ("sm_90a",))


def test_p100_on_kaggle_is_refused_with_what_to_do():
    plat = kaggle_p100.ENV
    gpus = query_gpus(plat.run)
    reason = gpu_unsupported_reason(gpus, plat.arch_list, plat.platform, plat.torch_version)
    assert reason is not None
    assert "Tesla P100-PCIE-16GB" in reason and "sm_60" in reason and "no kernel image" in reason
    assert "'GPU T4 x2'" in reason and "accelerator" in reason
    t4 = kaggle_t4x2.ENV
    assert gpu_unsupported_reason(query_gpus(t4.run), t4.arch_list, "kaggle") is None
    assert gpu_unsupported_reason(query_gpus(plat.run), CU126, "kaggle") is None  # an older torch still has sm_60
    assert gpu_unsupported_reason(gpus, (), "kaggle") is None  # a CPU-only torch: nothing to check here


def test_check_reads_gpus_and_arch_list_through_its_inputs():
    plat = kaggle_p100.ENV
    with pytest.raises(UnsupportedGpu) as caught:
        ensure_gpus_supported(environ=plat.environ, run=plat.run, arch=lambda: (plat.arch_list, plat.torch_version))
    assert caught.value.exit_code == EXIT_USAGE

    def no_torch():
        raise AssertionError("torch must not be consulted without a GPU")

    ensure_gpus_supported(environ=local.ENV.environ, run=local.ENV.run, arch=no_torch)


@pytest.mark.parametrize("command", [["doctor"], ["plan", "--profile", "tiny"], ["train", "--profile", "tiny"]])
def test_cli_exits_2_before_loading_anything_on_a_p100(command, monkeypatch, capsys, tmp_path):
    from runner import cli
    from runner.train import gpu_arch

    plat = apply(monkeypatch, kaggle_p100.ENV)
    monkeypatch.setattr(gpu_arch, "torch_arch_list", lambda: (plat.arch_list, plat.torch_version))
    monkeypatch.setattr("runner.commands.train", lambda args: pytest.fail("train started"))
    monkeypatch.setattr("runner.commands.plan", lambda args: pytest.fail("plan started"))
    monkeypatch.setattr("runner.doctor.run_doctor", lambda *a: pytest.fail("doctor started"))
    code = cli.main([*command, "--storage", str(tmp_path / "runs")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "sm_60" in err and "GPU T4 x2" in err and "Traceback" not in err


# ---------------------------------------------------------------- Kaggle secrets (stand-in of kaggle_secrets)

SECRET_CODE = """
import json, sys
from kaggle_secrets import UserSecretsClient
try:
    print(json.dumps({"value": UserSecretsClient().get_secret(sys.argv[1])}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "oserror": isinstance(exc, OSError)}))
"""


def ask_secret(plat, label: str, **extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SECRET_CODE, label], env=child_env(plat, **extra),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_kaggle_secret_from_a_child_process_and_how_it_fails():
    plat = kaggle_t4x2.ENV
    with KaggleSecretsService({"RELAY_GDRIVE_CREDENTIALS": '{"type": "authorized_user"}'}) as service:
        assert ask_secret(plat, "RELAY_GDRIVE_CREDENTIALS", KAGGLE_URL_BASE=service.url) == {
            "value": '{"type": "authorized_user"}'
        }
        missing = ask_secret(plat, "HF_TOKEN", KAGGLE_URL_BASE=service.url)
        assert missing["error"] == "BackendError" and "No user secrets exist" in missing["message"]
        no_token = ask_secret(plat, "HF_TOKEN", KAGGLE_URL_BASE=service.url, KAGGLE_USER_SECRETS_TOKEN="wrong")
        assert no_token["error"] == "CredentialError" and "401" in no_token["message"]
        assert service.asked == ["RELAY_GDRIVE_CREDENTIALS", "HF_TOKEN"]
    offline = ask_secret(plat, "HF_TOKEN", KAGGLE_URL_BASE=service.url)  # the service is gone: internet off
    assert offline["error"] == "ConnectionError" and offline["oserror"]


def test_kaggle_secrets_does_not_import_off_kaggle():
    done = subprocess.run([sys.executable, "-c", "import kaggle_secrets"], env=child_env(local.ENV),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_relay_reads_a_kaggle_secret_through_the_stand_in(monkeypatch):
    from runner.storage import credentials

    plat = kaggle_t4x2.ENV
    with KaggleSecretsService({"RELAY_GDRIVE_CREDENTIALS": "{}"}) as service:
        apply(monkeypatch, plat, KAGGLE_URL_BASE=service.url)
        for name in ("kaggle_secrets", "kaggle_web_client"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        assert credentials.kaggle_secret("RELAY_GDRIVE_CREDENTIALS") == "{}"
        assert credentials.kaggle_secret("NOT_ATTACHED") is None  # BackendError: not there
    for name in ("kaggle_secrets", "kaggle_web_client"):
        sys.modules.pop(name, None)


def test_on_kaggle_a_colab_secret_lookup_gives_way_to_the_kaggle_secret(monkeypatch, tmp_path):
    """google.colab imports on Kaggle, but userdata needs Colab's notebook kernel: colabtools'
    _message.blocking_request starts with get_ipython().kernel, None outside a kernel (a `!` child)."""
    from runner.storage import credentials

    def get(key):  # what google/colab/userdata.py get() does first, reached through _message/_ipython
        import IPython

        return IPython.get_ipython().kernel.parent  # AttributeError: 'NoneType' object has no attribute 'kernel'

    userdata = type(sys)("google.colab.userdata")
    userdata.get = get
    colab = type(sys)("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    account = '{"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}'
    with KaggleSecretsService({credentials.SECRET_NAME: account}) as service:
        apply(monkeypatch, kaggle_t4x2.ENV, KAGGLE_URL_BASE=service.url)
        for name in ("kaggle_secrets", "kaggle_web_client"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        found = credentials.find_credentials({}, home=tmp_path)
    assert found.source == f"Kaggle secret {credentials.SECRET_NAME}" and found.kind == "authorized_user"
    for name in ("kaggle_secrets", "kaggle_web_client"):
        sys.modules.pop(name, None)


# ---------------------------------------------------------------- the test-only tiny swap


def test_the_tiny_test_override_swaps_model_and_data_and_keeps_identity_and_effective_batch(monkeypatch):
    """RELAY_TEST_TINY_MODEL=N (tests only): the shipped profiles train the tiny model on generated images,
    under the same name, run key and effective batch, for N steps (runner/profile.py)."""
    from runner.errors import ProfileError
    from runner.profile import PROFILES_DIR, TEST_TINY_ENV, load_profile

    for path in sorted(PROFILES_DIR.glob("*.toml")):
        monkeypatch.delenv(TEST_TINY_ENV, raising=False)
        shipped = load_profile(path.stem)
        monkeypatch.setenv(TEST_TINY_ENV, "3")
        tiny = load_profile(path.stem, ["checkpoint.keep=5"])
        assert (tiny.model.base, tiny.data.source, tiny.train.steps) == ("tiny", "generated", 3), path
        assert (tiny.name, tiny.run_name) == (shipped.name, shipped.run_name), path
        assert tiny.train.batch_size * tiny.train.grad_accum == shipped.train.batch_size * shipped.train.grad_accum
        assert tiny.lora == shipped.lora and tiny.checkpoint.keep == 5  # the rest as shipped; --set still wins
    monkeypatch.setenv(TEST_TINY_ENV, "yes")
    with pytest.raises(ProfileError, match="RELAY_TEST_TINY_MODEL"):
        load_profile("tiny")
