"""The hands-off Kaggle chain (issue 22) against the stand-in Kaggle API on 127.0.0.1:7777.

The first test is the user's view: push the notebook once, and the chain carries the run to its
target through several sessions (each a fresh "VM" running the notebook headlessly), stops
there, and leaves a final LoRA bit-identical to an uninterrupted run's. The others call the
chain's `after_session` against the same server through the real kagglesdk client: two sessions
ending at once push one successor; exit 2, the weekly quota and `relay stop --chain` stop it;
a refused push stops it and can be retried. Every session's credentials come from the
notebook's Kaggle secrets; none may land in the run's store.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from runner import chain, chainrecords
from runner.chain import KaggleCredentials, SdkKaggleApi
from runner.clock import SystemClock
from runner.kaggle_api import KaggleApiError
from runner.state import RunInfo, append_session, write_run_info
from runner.storage.url import open_storage
from tests.e2e.conftest import FAST, RUN, STEPS, assert_same_lora, relay_main, sessions
from tests.platforms.kaggle_api.server import KaggleStandIn

pytest.importorskip("kagglesdk")

USER, KEY, NOTEBOOK = "ada", "k3y-0123456789abcdef", "ada/relay-chain"
PER_SESSION = 2  # steps a session trains before its (stand-in) time is up
CHAIN_SETS = ("session.chain=kaggle", f"session.chain_notebook={NOTEBOOK}")


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # kagglesdk → http://localhost:7777
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("RELAY_STORAGE_ON_VM", "1")  # a local folder stands in for a store that outlives the VMs
    with KaggleStandIn(tmp_path / "kaggle", username=USER, key=KEY) as server:
        yield server


def api() -> SdkKaggleApi:
    return SdkKaggleApi(KaggleCredentials(USER, KEY))


def notebook_source(storage: Path) -> str:
    """The user's notebook: read the Kaggle secrets, train until the session is up, then hand over."""
    sets = [a for item in (*FAST, f"train.steps={STEPS}", *CHAIN_SETS) for a in ("--set", item)]
    cells = [
        "import os, subprocess, sys, tempfile\n"
        "from kaggle_secrets import UserSecretsClient\n"
        "secrets = UserSecretsClient()\n"
        "CHAIN_ENV = {**os.environ, 'KAGGLE_USERNAME': secrets.get_secret('KAGGLE_USERNAME'),\n"
        "             'KAGGLE_KEY': secrets.get_secret('KAGGLE_KEY')}\n"
        f"RUN_ARGS = ['--profile', 'tiny', '--storage', {str(storage)!r}, *{sets!r}]\n"
        "begin = subprocess.run([sys.executable, '-m', 'runner.chain', 'begin', *RUN_ARGS], capture_output=True, text=True)\n"
        "print(begin.stdout, begin.stderr)\n"
        "assert begin.returncode == 0, begin.stderr",
        "work = tempfile.mkdtemp(prefix='kaggle-temp-')  # a fresh VM: nothing local survives\n"
        f"train = subprocess.run([sys.executable, '-m', 'tests.platforms.kaggle_api.short_session', '{PER_SESSION}',\n"
        "                        '--', 'train', *RUN_ARGS, '--workdir', work, '--plain'], capture_output=True, text=True)\n"
        "print(train.stdout[-2000:], train.stderr[-2000:])\n"
        "print('relay exited with', train.returncode)",
        "after = subprocess.run([sys.executable, '-m', 'runner.chain', 'after', '--exit-code', str(train.returncode),\n"
        "                        *RUN_ARGS, '--settle-s', '0.3'],\n"
        "                       env=CHAIN_ENV, capture_output=True, text=True)\n"
        "print(after.stdout, after.stderr)\n"
        "assert after.returncode == 0, after.stderr",
    ]
    nb = {
        "cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": c}
                  for c in cells],  # fmt: skip
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }  # fmt: skip
    return json.dumps(nb)


def assert_no_secret(root: Path) -> None:
    leaked = [p for p in root.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, f"the Kaggle key was written to {leaked}"


def test_the_chain_carries_the_run_to_its_target(kaggle, tmp_path, reference):
    storage = tmp_path / "storage"
    kaggle.add_kernel(NOTEBOOK, notebook_source(storage))
    client = api()
    metadata, source = client.get_kernel(NOTEBOOK)
    client.save_kernel(NOTEBOOK, metadata, source, "NvidiaTeslaT4")  # the user's one push ("Save Version")

    assert kaggle.wait_idle(900), "the chain did not come to rest"
    runs = kaggle.kernels[NOTEBOOK].versions[1:]
    logs = "\n".join(f"--- version {v.number}: {v.status} in {v.seconds:.0f} s\n{v.log[-3000:]}" for v in runs)
    assert [v.status for v in runs] == ["COMPLETE"] * (STEPS // PER_SESSION), logs
    records = sessions(storage / RUN)
    assert [(s["step_from"], s["step_to"], s["reason"]) for s in records] == [
        (0, 2, "budget"), (2, 4, "budget"), (4, 6, "completed")
    ], logs  # fmt: skip
    assert {s["platform"] for s in records} == {"kaggle"}
    assert_same_lora(storage / RUN / "final" / "pytorch_lora_weights.safetensors", reference.final_lora)

    pushes = kaggle.pushes()[1:]  # the chain's own, after the user's
    assert len(pushes) == 2
    for push in pushes:
        assert push["slug"] == NOTEBOOK and push["text"] == source
        assert (push["enableGpu"], push["enableInternet"], push["machineShape"]) == (True, True, "NvidiaTeslaT4")
    state = chain.status(open_storage(str(storage)), RUN)
    assert (state.pushed, state.stopped, state.next_queued) == (2, chain.COMPLETED, None)
    assert_no_secret(storage)


# ---------------------------------------------------------------- one session's end, by the API


def make_run(storage_dir: Path, *, step: int, target: int = 40, hours: float = 0.5, platform: str = "kaggle"):
    """A run's store at `step` of `target` after a session of `hours` on `platform` (no weights: the chain reads none)."""
    storage = open_storage(str(storage_dir))
    write_run_info(storage, RunInfo(RUN, {}, "f" * 12, target, "2026-12-01T00:00:00Z"))
    now = SystemClock().wall()
    append_session(storage, RUN, {"platform": platform, "gpu_count": 1, "start_wall": now - hours * 3600,
                                  "end_wall": now - 60, "steps": step, "reason": "budget"})  # fmt: skip
    commit = storage_dir / RUN / "checkpoints" / f"step-{step:08d}" / "COMMIT.json"
    commit.parent.mkdir(parents=True)
    commit.write_text("{}")
    return storage


def end_session(storage, code: int = 75, *, link: int = 0, settle_s: float = 0.2):
    """A session that began at chain link `link` (what begin_session returned) ends with `code`."""
    return chain.after_session(code, storage=storage, run=RUN, notebook=NOTEBOOK, api=api(), link=link,
                               gpu_names=["Tesla T4", "Tesla T4"], settle_s=settle_s)  # fmt: skip


@pytest.fixture
def idle_kaggle(kaggle):
    kaggle.run_pushed = False  # record pushes only
    kaggle.add_kernel(NOTEBOOK, '{"cells": []}')
    return kaggle


def test_two_sessions_ending_at_once_push_one_successor(idle_kaggle, tmp_path):
    storage = make_run(tmp_path / "storage", step=10)
    decisions = []
    racers = [threading.Thread(target=lambda: decisions.append(end_session(storage, settle_s=1.0))) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(d.reason for d in decisions) == [chain.LOST_RACE, chain.PUSHED]
    assert len(idle_kaggle.pushes()) == 1

    late = end_session(storage)  # a third racer, or the same session's hook run again
    assert (late.reason, late.version) == (chain.QUEUED, 2)
    assert len(idle_kaggle.pushes()) == 1
    assert chain.status(storage, RUN).next_queued["version"] == 2

    successor = end_session(storage, link=chainrecords.claimed_link(storage, RUN))  # the successor, when its time is up
    assert (successor.reason, successor.successor, successor.version) == (chain.PUSHED, 2, 3)
    assert len(idle_kaggle.pushes()) == 2
    assert_no_secret(tmp_path / "storage")


@pytest.mark.parametrize("code", [1, 2])
def test_an_error_that_needs_a_person_stops_the_chain(idle_kaggle, tmp_path, code):
    storage = make_run(tmp_path / "storage", step=10)
    decision = end_session(storage, code)
    assert (decision.action, decision.reason) == ("stop", chain.NEEDS_PERSON)
    assert f"exit {code}" in decision.message
    assert idle_kaggle.pushes() == []
    assert chain.status(storage, RUN).stopped == chain.NEEDS_PERSON


def test_the_target_reached_ends_the_chain(idle_kaggle, tmp_path):
    storage = make_run(tmp_path / "storage", step=40, target=40)
    assert end_session(storage, 75).reason == chain.COMPLETED  # even an interrupted last session
    assert idle_kaggle.pushes() == []


def test_the_weekly_quota_stops_the_chain(idle_kaggle, tmp_path):
    storage = make_run(tmp_path / "storage", step=10)
    idle_kaggle.quota_used_h = 29.5  # the API: 0.5 h of 30 left
    decision = end_session(storage)
    assert decision.reason == chain.QUOTA and "0.5 h" in decision.message
    assert idle_kaggle.pushes() == []


def test_without_a_quota_api_the_runs_own_hours_count(idle_kaggle, tmp_path):
    idle_kaggle.quota_total_h = None  # the API cannot tell
    storage = make_run(tmp_path / "storage", step=10, hours=29.8)
    assert end_session(storage).reason == chain.QUOTA
    assert idle_kaggle.pushes() == []


def test_relay_stop_chain_stops_it_and_undo_lets_it_go_on(idle_kaggle, tmp_path):
    storage = make_run(tmp_path / "storage", step=10)
    assert relay_main(["stop", "--chain", "--storage", str(tmp_path / "storage")]) == 0
    assert chain.status(storage, RUN).stop_requested
    assert end_session(storage).reason == chain.STOP_FLAG
    assert idle_kaggle.pushes() == []
    assert chain.status(storage, RUN).stopped == chain.STOP_FLAG

    assert relay_main(["stop", "--chain", "--undo", "--storage", str(tmp_path / "storage")]) == 0
    assert end_session(storage).reason == chain.PUSHED
    assert len(idle_kaggle.pushes()) == 1


def test_a_refused_push_stops_and_a_later_session_may_retry(idle_kaggle, tmp_path):
    storage = make_run(tmp_path / "storage", step=10)
    idle_kaggle.save_error = "push refused (stand-in)"
    failed = end_session(storage)
    assert failed.reason == chain.PUSH_FAILED and "push refused" in failed.message
    idle_kaggle.save_error = None
    assert end_session(storage).reason == chain.PUSHED  # the failed claim does not block successor 1


def test_a_colab_session_hands_over_to_the_users_kaggle_notebook(idle_kaggle, tmp_path):
    idle_kaggle.quota_total_h = None
    storage = make_run(tmp_path / "storage", step=10, hours=29.8, platform="colab")  # Colab hours are not Kaggle's
    decision = end_session(storage, link=chain.begin_session(storage, RUN, tmp_path / "colab-vm.json", SystemClock()))
    assert (decision.reason, decision.version) == (chain.PUSHED, 2)
    assert idle_kaggle.pushes()[0]["slug"] == NOTEBOOK


def test_an_api_token_is_sent_as_a_bearer_and_a_wrong_key_is_refused(idle_kaggle):
    idle_kaggle.secrets["KAGGLE_API_TOKEN"] = "KGAT_stand-in-token"
    metadata, _ = SdkKaggleApi(KaggleCredentials(USER, token="KGAT_stand-in-token")).get_kernel(NOTEBOOK)
    assert metadata["ref"] == NOTEBOOK
    with pytest.raises(KaggleApiError, match="401") as err:
        SdkKaggleApi(KaggleCredentials(USER, "wrong-key")).get_kernel(NOTEBOOK)
    assert "wrong-key" not in str(err.value)
    with pytest.raises(KaggleApiError, match="403"):  # never another account's notebook
        api().get_kernel("bob/his-notebook")


@pytest.mark.parametrize("given", ["key", "token"])
def test_inside_a_notebook_the_chain_sends_the_users_credential_not_the_session_token(idle_kaggle, tmp_path,
                                                                                      monkeypatch, given):  # fmt: skip
    """In a Kaggle notebook kagglesdk prefers the session token in the file KAGGLE_API_V1_TOKEN names
    (kagglesdk kaggle_env.py get_access_token_from_env, when KAGGLE_KERNEL_RUN_TYPE and KAGGLE_DATA_PROXY_URL
    are set); the stand-in refuses it for SaveKernel. Every chain call must send the user's own credential."""
    from tests.platforms.kaggle_api.server import SESSION_TOKEN

    token_file = tmp_path / "api-v1-token"
    token_file.write_text(SESSION_TOKEN)
    for name, value in {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_DATA_PROXY_URL": "https://dp.kaggle.net",
                        "KAGGLE_API_V1_TOKEN": str(token_file)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    idle_kaggle.secrets["KAGGLE_API_TOKEN"] = "KGAT_stand-in-token"
    env = (
        {"KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY} if given == "key" else {"KAGGLE_API_TOKEN": "KGAT_stand-in-token"}
    )
    client = SdkKaggleApi(KaggleCredentials.from_env(env))
    metadata, source = client.get_kernel(NOTEBOOK)
    assert client.save_kernel(NOTEBOOK, metadata, source, "NvidiaTeslaT4") == 2
    assert client.gpu_quota_left_h() == 30.0
    assert {how for _, how in idle_kaggle.auth_used} == {given}, idle_kaggle.auth_used

    from kagglesdk import KaggleClient  # what kagglesdk alone would send from the notebook: refused for a push
    from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelRequest

    bare = KaggleClient(username=USER, password=KEY, user_agent="t")
    req = ApiSaveKernelRequest()
    req.slug, req.text = NOTEBOOK, source
    with pytest.raises(Exception, match="session token may not save"):
        bare.kernels.kernels_api_client.save_kernel(req)
    assert idle_kaggle.auth_used[-1] == ("SaveKernel", "session")


def test_an_empty_user_agent_is_refused(idle_kaggle):
    """kagglesdk's KaggleClient sends an empty User-Agent unless given one (kaggle_client.py user_agent='');
    the stand-in refuses it, so the chain must name itself."""
    from kagglesdk import KaggleClient
    from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

    req = ApiGetKernelRequest()
    req.user_name, req.kernel_slug = NOTEBOOK.split("/")
    with pytest.raises(Exception, match="User-Agent"):
        KaggleClient(username=USER, password=KEY).kernels.kernels_api_client.get_kernel(req)
    assert api().get_kernel(NOTEBOOK)[0]["ref"] == NOTEBOOK


class NoWait(SystemClock):
    """The real clock, but waits are recorded instead of slept."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_the_successor_asks_for_this_sessions_gpus_not_a_stale_shape_and_is_pushed_as_the_cli_would(idle_kaggle,
                                                                                                     tmp_path):  # fmt: skip
    """GetKernel may carry the machine of an old version (a P100 once chosen); the push asks for what this
    session ran on (T4 ×2 → NvidiaTeslaT4), with the title, outputs cleared and one-string cell sources
    (kaggle-cli kernels_push)."""
    saved = {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": 3, "source": ["a = 1\n", "print(a)"],
                        "outputs": [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]}],
             "metadata": {}, "nbformat": 4, "nbformat_minor": 5}  # fmt: skip
    idle_kaggle.add_kernel(NOTEBOOK, json.dumps(saved), machineShape="NvidiaTeslaP100", title="Relay chain")
    storage = make_run(tmp_path / "storage", step=10)
    assert end_session(storage).reason == chain.PUSHED
    push = idle_kaggle.pushes()[-1]
    assert push["machineShape"] == "NvidiaTeslaT4" and push["newTitle"] == "Relay chain"
    cell = json.loads(push["text"])["cells"][0]
    assert cell["source"] == "a = 1\nprint(a)" and cell["outputs"] == []


def test_a_full_session_cap_is_waited_out_a_bounded_time_then_stops_with_a_reason_status_shows(idle_kaggle, tmp_path,
                                                                                              capsys):  # fmt: skip
    storage = make_run(tmp_path / "storage", step=10)
    idle_kaggle.busy_pushes = 2
    clock = NoWait()
    decision = chain.after_session(75, storage=storage, run=RUN, notebook=NOTEBOOK, api=api(), link=0, clock=clock,
                                   gpu_names=["Tesla T4", "Tesla T4"], settle_s=0.2)  # fmt: skip
    assert decision.reason == chain.PUSHED and clock.waits[-2:] == list(chain.CAP_RETRY_WAITS_S[:2])

    idle_kaggle.busy_pushes = 100
    clock = NoWait()
    link = chainrecords.claimed_link(storage, RUN)
    decision = chain.after_session(75, storage=storage, run=RUN, notebook=NOTEBOOK, api=api(), link=link, clock=clock,
                                   gpu_names=["Tesla T4", "Tesla T4"], settle_s=0.2)  # fmt: skip
    assert decision.reason == chain.SESSION_CAP and "Maximum batch GPU session count reached" in decision.message
    assert [w for w in clock.waits if w >= 60] == list(chain.CAP_RETRY_WAITS_S)  # bounded
    assert chain.status(storage, RUN).stopped == chain.SESSION_CAP
    capsys.readouterr()
    assert relay_main(["status", "--storage", str(tmp_path / "storage")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "stopped: session-cap (Kaggle refused the push 4 times" in said, said


def begin_on_kaggle(storage: Path, monkeypatch, capsys, **env: str) -> str:
    """`python -m runner.chain begin` as the Kaggle cell runs it (Kaggle's variables: tests/platforms/kaggle_t4x2.py)."""
    from tests.platforms import apply, kaggle_t4x2

    apply(monkeypatch, kaggle_t4x2.ENV, KAGGLE_API_ENVIRONMENT="TEST", **env)
    args = ["begin", "--profile", "tiny", "--storage", str(storage), "--state-file", str(storage.parent / "st.json"),
            *[a for item in CHAIN_SETS for a in ("--set", item)]]  # fmt: skip
    capsys.readouterr()
    assert chain.main(args) == 0
    return capsys.readouterr().out


def test_a_kaggle_session_is_sized_by_the_accounts_quota_and_says_so(idle_kaggle, tmp_path, monkeypatch, capsys):
    """At the session's start `begin` reads GetAcceleratorQuotaStatistics (allowed − used − reserved, no ×2 for
    two GPUs); the cell passes the end it allows to the trainer, whose limit becomes min(12 h, that end)."""
    from runner import notebook
    from runner.env import detect_env

    idle_kaggle.quota_total_h, idle_kaggle.quota_used_h = 6.0, 1.0  # an account with 6 h a week
    storage = make_run(tmp_path / "storage", step=10)
    said = begin_on_kaggle(tmp_path / "storage", monkeypatch, capsys, KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    assert "5.0 h of this week's Kaggle GPU quota left" in said, said
    child = notebook.quota_end(said)
    env = detect_env(environ={**os.environ, **child}, exists=lambda p: False, read=lambda p: "60.0 1.0\n",
                     run=lambda cmd: "Tesla T4, 15360, 15095, 7.5\nTesla T4, 15360, 15095, 7.5\n")  # fmt: skip
    assert env.session_limit_h == pytest.approx(5.0 + 60 / 3600, abs=0.01)  # from the start, 60 s before the reading
    assert "GetAcceleratorQuotaStatistics" in env.limit_source and "5.0 h left" in env.limit_source
    recorded = [k for k in storage.list(f"{RUN}/chain/quota") if k.endswith(".json")]
    assert len(recorded) == 1
    assert KEY not in said


def test_an_older_kagglesdk_without_the_quota_call_says_so_and_records_it(idle_kaggle, tmp_path, monkeypatch, capsys):
    from kagglesdk.kernels.services.kernels_api_service import KernelsApiClient

    monkeypatch.delattr(KernelsApiClient, "get_accelerator_quota_statistics")
    storage = make_run(tmp_path / "storage", step=10)
    said = begin_on_kaggle(tmp_path / "storage", monkeypatch, capsys, KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    assert "sized by Kaggle's 12 h limit alone" in said and "has no GetAcceleratorQuotaStatistics" in said, said
    assert "Traceback" not in said and chain.QUOTA_LINE not in said
    key = next(k for k in storage.list(f"{RUN}/chain/quota") if k.endswith(".json"))
    assert "no GetAcceleratorQuotaStatistics" in json.loads(storage_dir_read(tmp_path / "storage", key))["note"]


def test_without_credentials_the_session_keeps_the_12_h_limit_and_says_why(idle_kaggle, tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "storage", step=10)
    said = begin_on_kaggle(tmp_path / "storage", monkeypatch, capsys)
    assert "sized by Kaggle's 12 h limit alone" in said and "no Kaggle API credentials" in said, said


def storage_dir_read(root: Path, key: str) -> str:
    return (root / key).read_text()
