"""The chain's pure decision, its successor claim on a plain folder store, credentials and profile keys.

The chain against the stand-in Kaggle API, and a whole chain of sessions, are in tests/e2e/test_chain.py.
"""

from __future__ import annotations

import pytest

from runner import chain, chainrecords
from runner.chain import ChainFacts, KaggleCredentials, accelerator_for, decide
from runner.chainrecords import claim_successor
from runner.clock import FakeClock
from runner.errors import CredentialsError, ProfileError
from runner.profile import fingerprint, load_profile
from runner.storage.url import open_storage

GOING = ChainFacts(target_reached=False, stop_requested=False, quota_left_h=20.0)


@pytest.mark.parametrize(
    ("code", "facts", "reason"),
    [
        (75, GOING, chain.PUSHED),
        (0, GOING, chain.COMPLETED),
        (75, ChainFacts(True, False, 20.0), chain.COMPLETED),  # the target reached by an interrupted session
        (1, GOING, chain.NEEDS_PERSON),
        (2, GOING, chain.NEEDS_PERSON),  # bad input, a refused resume
        (130, GOING, chain.NEEDS_PERSON),
        (75, ChainFacts(False, True, 20.0), chain.STOP_FLAG),
        (75, ChainFacts(False, False, 0.9), chain.QUOTA),
        (75, ChainFacts(False, False, None), chain.PUSHED),  # quota unknown: go on
        (75, ChainFacts(False, False, 20.0, queued_version=7), chain.QUEUED),
        (2, ChainFacts(False, True, 0.0, queued_version=7), chain.NEEDS_PERSON),  # the person is told first
    ],
)
def test_decide(code, facts, reason):
    decision = decide(code, facts)
    assert decision.reason == reason
    assert decision.continues == (reason == chain.PUSHED)


def test_the_smallest_useful_session_is_a_setting():
    assert decide(75, ChainFacts(False, False, 1.5, min_session_h=2.0)).reason == chain.QUOTA
    assert decide(75, ChainFacts(False, False, 1.5, min_session_h=1.0)).reason == chain.PUSHED


def test_credentials_never_show_the_key():
    creds = KaggleCredentials.from_env({"KAGGLE_USERNAME": "ada", "KAGGLE_KEY": "s3cret"})
    assert "s3cret" not in repr(creds) and creds.key == "s3cret"
    assert KaggleCredentials.from_kaggle_json('{"username": "ada", "key": "s3cret"}') == creds
    with pytest.raises(CredentialsError) as err:
        KaggleCredentials.from_kaggle_json('{"username": "ada", "key": ', source="secret KAGGLE_JSON")
    assert "secret KAGGLE_JSON" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(CredentialsError, match="KAGGLE_USERNAME"):
        KaggleCredentials.from_env({"KAGGLE_USERNAME": "ada"})


def test_the_generated_api_token_alone_is_a_credential_and_wins_over_a_key():
    """kaggle.com → Settings → API → "Generate New Token" gives a token for KAGGLE_API_TOKEN; no username needed."""
    token = KaggleCredentials.from_env({"KAGGLE_API_TOKEN": "KGAT_x"})
    assert token.token == "KGAT_x" and "KGAT_x" not in repr(token) and "KAGGLE_API_TOKEN" in token.kind
    both = KaggleCredentials.from_env({"KAGGLE_USERNAME": "ada", "KAGGLE_KEY": "s3cret", "KAGGLE_API_TOKEN": "KGAT_x"})
    assert (both.token, both.key) == ("KGAT_x", "")  # one credential is sent, never both


def test_the_successor_asks_for_the_gpu_this_session_had():
    assert accelerator_for(["Tesla T4", "Tesla T4"], {}) == "NvidiaTeslaT4"
    assert accelerator_for(["NVIDIA L4"], {}) == "NvidiaL4"
    assert accelerator_for(["Tesla P100-PCIE-16GB"], {}) == "NvidiaTeslaT4"  # no sm_60 kernels in Kaggle's torch
    assert accelerator_for(["Tesla T4", "Tesla T4"], {"machineShape": "NvidiaTeslaP100"}) == "NvidiaTeslaT4"
    assert accelerator_for([], {"machineShape": "NvidiaL4"}) == "NvidiaL4"  # no GPU seen: the notebook's own
    assert accelerator_for([], {"machineShape": "NvidiaTeslaP100"}) == "NvidiaTeslaT4"  # never a P100


def test_chain_settings_are_checked_and_change_no_weights():
    base = load_profile("tiny")
    chained = load_profile("tiny", ["session.chain=kaggle", "session.chain_notebook=ada/relay-chain"])
    assert (chained.session.chain, chained.session.chain_notebook) == ("kaggle", "ada/relay-chain")
    assert fingerprint(chained) == fingerprint(base)  # turning the chain on or off never refuses a resume
    with pytest.raises(ProfileError, match="session.chain"):
        load_profile("tiny", ["session.chain=colab"])
    with pytest.raises(ProfileError, match="session.chain_notebook"):
        load_profile("tiny", ["session.chain_notebook=relay-chain"])


def test_a_later_claimer_sees_the_earlier_claim_and_loses(tmp_path):
    storage, clock = open_storage(str(tmp_path)), FakeClock()
    first = claim_successor(storage, "run", 3, clock, settle_s=5)
    assert first is not None and first.startswith("run/chain/successor-0003/claim-")
    assert claim_successor(storage, "run", 3, clock, settle_s=5) is None
    assert clock.sleeps == [5]  # the loser lost at its first look, without waiting


def test_of_two_claims_written_before_either_looked_again_the_lowest_wins(tmp_path, monkeypatch):
    storage, clock = open_storage(str(tmp_path)), FakeClock()
    other = "run/chain/successor-0001/claim-00000000000000000000000000000000.json"  # lower than any uuid4 hex

    def racer_writes_during_my_wait(seconds):  # both found the folder empty; the racer's claim lands meanwhile
        (tmp_path / other).write_text("{}")

    monkeypatch.setattr(clock, "sleep", racer_writes_during_my_wait)
    assert claim_successor(storage, "run", 1, clock, settle_s=5) is None


def test_a_session_keeps_the_link_it_began_with(tmp_path):
    storage, clock = open_storage(str(tmp_path / "store")), FakeClock()
    note = tmp_path / "vm-tmp" / "relay-chain-run.json"
    assert chainrecords.begin_session(storage, "run", note, clock) == 0
    assert note.stat().st_mode & 0o777 == 0o600
    assert claim_successor(storage, "run", 1, clock, settle_s=1) is not None  # this session's successor
    assert chainrecords.claimed_link(storage, "run") == 1
    assert chainrecords.begin_session(storage, "run", note, clock) == 0  # a restarted kernel on the same VM
    assert chainrecords.begin_session(storage, "run", tmp_path / "other-vm.json", clock) == 1  # the successor's VM


def test_status_shows_the_queued_successor_until_a_session_starts_from_it(tmp_path):
    storage, clock = open_storage(str(tmp_path / "store")), FakeClock()
    chainrecords.begin_session(storage, "run", tmp_path / "vm1.json", clock)
    chainrecords.put_json(storage, "run/chain/successor-0001/pushed.json", {"index": 1, "version": 5})
    assert chainrecords.status(storage, "run").next_queued == {"index": 1, "version": 5}
    chainrecords.begin_session(storage, "run", tmp_path / "vm2.json", clock)
    state = chainrecords.status(storage, "run")
    assert (state.pushed, state.next_queued, state.stopped) == (1, None, None)
