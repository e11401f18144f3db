"""One run on the Hugging Face Hub store (issue 18), against the stand-in Hub on 127.0.0.1.

The real huggingface_hub client in Relay talks to tests/hubserver through HF_ENDPOINT. A session
is SIGKILLed after a checkpoint commit landed; the next one takes the lease over (compare-and-swap)
and finishes; the final LoRA equals an uninterrupted local run's bit for bit. Then one run carried
across two accounts whose tokens both write to one repo (an organisation's).
"""

from __future__ import annotations

import json
import signal

import pytest

from runner import events
from runner.errors import EXIT_OK, EXIT_PREEMPTED
from tests.e2e.conftest import (
    RUN,
    assert_same_lora,
    relay_env,
    send,
    start_relay,
    train_args,
    wait_for,
    wait_relay,
)
from tests.hubserver import HubServer

REPO_ID = "team/relay-runs"
URL = f"hf://{REPO_ID}"
FINAL = f"{RUN}/final/pytorch_lora_weights.safetensors"


@pytest.fixture
def hub():
    with HubServer() as server:
        server.state.orgs["team"] = {"alice", "bob"}
        yield server


def hub_env(hub: HubServer, token: str) -> dict[str, str]:
    return {
        "HF_TOKEN": token,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "RELAY_HUB_COMMITS_PER_HOUR": "1000000",  # the stand-in has no rate limit; spacing is unit-tested
    }


def committed_steps(hub: HubServer) -> list[int]:
    if ("model", REPO_ID) not in hub.state.repos:
        return []
    prefix = f"{RUN}/checkpoints/step-"
    return sorted(int(p[len(prefix) :].split("/")[0]) for p in hub.state.files(REPO_ID) if p.startswith(prefix)
                  and p.endswith("/COMMIT.json"))  # fmt: skip


def test_sigkill_then_resume_on_the_hub_gives_the_uninterrupted_lora(hub, reference, tmp_path, reliability):
    token = hub.state.add_token("alice")
    env = relay_env(hub_env(hub, token))
    log = tmp_path / "first.log"
    first = start_relay(train_args(URL, tmp_path / "work"), log, env=env)
    assert wait_for(lambda: first.poll() is not None or any(s >= 2 for s in committed_steps(hub)), 240)
    send(first, signal.SIGKILL)
    code = wait_relay(first)
    assert code != 0, f"the first session ended by itself:\n{log.read_text()[-3000:]}"
    killed_at = max(committed_steps(hub))
    commits_before = len(hub.state.commits(REPO_ID))

    second_log = tmp_path / "second.log"
    second = start_relay(train_args(URL, tmp_path / "fresh-vm", flags=("--take-over",)), second_log, env=env)
    assert wait_relay(second, timeout_s=400) == 0, second_log.read_text()[-3000:]
    final = tmp_path / "final.safetensors"
    final.write_bytes(hub.state.files(REPO_ID)[FINAL])
    assert_same_lora(final, reference.final_lora)
    log_lines = hub.state.files(REPO_ID)[f"{RUN}/sessions.jsonl"].decode().splitlines()
    resumed = [json.loads(line) for line in log_lines if line.strip()][-1]
    assert (resumed["step_from"], resumed["reason"]) == (killed_at, "completed"), "resumed from the last commit"
    titles = [c.title for c in hub.state.commits(REPO_ID)[commits_before:]]
    assert len(titles) == len(set(titles)), "no commit was made twice"
    assert token not in log.read_text() + second_log.read_text()
    reliability.record("SIGKILL mid-run on the Hugging Face Hub store", test="test_sigkill_then_resume_on_the_hub_"
                       "gives_the_uninterrupted_lora", injected=1, survived=True, notes={f"after step {killed_at}": 1})  # fmt: skip


@pytest.mark.slow
@pytest.mark.exact_resume
def test_second_account_finishes_the_run_on_the_hub_exactly(hub, tmp_path, tmp_path_factory, monkeypatch):
    from tests.e2e.test_resume import FINAL_LORA, reference_storage, run_session

    reference = reference_storage(tmp_path_factory)
    for name, value in hub_env(hub, hub.state.add_token("alice")).items():
        monkeypatch.setenv(name, value)
    first = run_session(URL, tmp_path / "alice", stop_after=2)
    assert first.code == EXIT_PREEMPTED, first.warnings()
    monkeypatch.setenv("HF_TOKEN", hub.state.add_token("bob"))
    second = run_session(URL, tmp_path / "bob")
    assert second.code == EXIT_OK, second.warnings()
    assert [e.step for e in second.of(events.StepDone)] == [3, 4, 5], "Bob continues from Alice's step 2"
    final = tmp_path / "final.safetensors"
    final.write_bytes(hub.state.files(REPO_ID)[f"{RUN}/{FINAL_LORA}"])
    assert_same_lora(final, reference / RUN / FINAL_LORA)
    authors = {c.author for c in hub.state.commits(REPO_ID)}
    assert {"alice", "bob"} <= authors


def test_rate_limits_server_errors_and_lost_commit_answers_during_a_run(hub, reference, tmp_path, reliability):
    """A whole run while every 4th request to the Hub fails (429 with Retry-After, 500, 503) and the answer of
    every 3rd commit is lost after the Hub applied it: same LoRA, no commit made twice."""
    from runner.context import build_context
    from runner.storage.hub import open_hub
    from runner.storage.retry import RetryPolicy
    from tests.e2e.conftest import relay_main

    env = hub_env(hub, hub.state.add_token("alice"))
    fast = RetryPolicy(attempts=8, initial_s=0.01, max_s=0.05, jitter_s=0.01)

    def contexts(opts, **kwargs):  # the Hub client of alice's token, with a fast retry policy
        return build_context(opts, open_store=lambda url: open_hub(url, env=env, retry=fast), **kwargs)

    errors = hub.faults.fail_every(4, (429, 500, 503), retry_after_s=0)  # any request: API, uploads, downloads
    hub.faults.drop_every_commits = 3
    code = relay_main(train_args(URL, reference.seed_workdir(tmp_path / "work")), contexts=contexts)
    assert code == 0
    assert errors.injected >= 10 and hub.faults.dropped >= 2, (errors.injected, hub.faults.dropped)
    assert not hub.requests_matching(r"whoami")[1:], "the rate-limited whoami is called once per session"
    final = tmp_path / "final.safetensors"
    final.write_bytes(hub.state.files(REPO_ID)[FINAL])
    assert_same_lora(final, reference.final_lora)
    titles = [c.title for c in hub.state.commits(REPO_ID)]
    assert len(titles) == len(set(titles)), "a lost answer was retried into a duplicate commit"
    test = "test_rate_limits_server_errors_and_lost_commit_answers_during_a_run"
    reliability.record("Hub 429 (Retry-After) / 500 / 503 on every 4th request", test=test,
                       injected=errors.injected, survived=True)  # fmt: skip
    reliability.record("Hub commit applied but its answer lost", test=test, injected=hub.faults.dropped, survived=True)


def test_a_takeover_while_the_first_trainer_runs_leaves_one_writer_on_the_hub(hub, reference, tmp_path, reliability):
    """Alice's trainer runs slowly; once it has committed step 2, Bob's takes the run over (--take-over) and
    finishes it. From Bob's lease commit on, the Hub holds no commit of Alice's: her next checkpoint commit
    names a parent where the lease was hers, the Hub refuses it (412), and her trainer exits 3 without
    deleting, recording or exporting anything. Bob's final LoRA is the uninterrupted run's, bit for bit."""
    from runner.errors import EXIT_REFUSED
    from tests.e2e.conftest import wait_for

    alice = relay_env({**hub_env(hub, hub.state.add_token("alice")), "RELAY_TEST_STEP_DELAY_S": "6"})
    bob = relay_env(hub_env(hub, hub.state.add_token("bob")))
    first = start_relay(train_args(URL, reference.seed_workdir(tmp_path / "a")), tmp_path / "a.log", env=alice)
    assert wait_for(lambda: first.poll() is not None or max(committed_steps(hub), default=0) >= 2, 300)
    assert first.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
    second = start_relay(train_args(URL, reference.seed_workdir(tmp_path / "b"), flags=("--take-over",)),
                         tmp_path / "b.log", env=bob)  # fmt: skip
    code_b, code_a = wait_relay(second, timeout_s=400), wait_relay(first, timeout_s=400)
    log_a, log_b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert (code_a, code_b) == (EXIT_REFUSED, 0), f"A {code_a}, B {code_b}:\n{log_a[-2000:]}\n----\n{log_b[-2000:]}"
    assert "another session is training this run" in log_a and "Traceback" not in log_a
    commits = hub.state.commits(REPO_ID)
    taken = next(i for i, c in enumerate(commits) if c.author == "bob" and "lease.json" in c.title)
    assert {c.author for c in commits[taken:]} == {"bob"}, [(c.author, c.title) for c in commits[taken:]]
    final = tmp_path / "final.safetensors"
    final.write_bytes(hub.state.files(REPO_ID)[FINAL])
    assert_same_lora(final, reference.final_lora)
    assert max(committed_steps(hub)) == reference.steps
    reliability.record("takeover while the first trainer still runs (Hugging Face Hub)",
                       test="test_a_takeover_while_the_first_trainer_runs_leaves_one_writer_on_the_hub",
                       injected=1, survived=True)  # fmt: skip
