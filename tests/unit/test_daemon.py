"""The supervisor's restart decisions and the events log that detached views follow."""

from __future__ import annotations

import signal

import pytest

from runner import daemon
from runner import events as ev
from runner.rundir import run_dir_for

POLICY = daemon.Policy(max_restarts=3, backoff_s=10, backoff_max_s=25)


def decide(code, committed=10, failed_at=None, restarts=0, tail="", stop=False):
    return daemon.decide(code, committed_step=committed, failed_at_step=failed_at, restarts=restarts,
                         policy=POLICY, log_tail=tail, stop_requested=stop)  # fmt: skip


@pytest.mark.parametrize("code", [0, 2, 75])
def test_never_restarts_after_done_bad_input_or_session_over(code):
    assert not decide(code).restart


def test_restarts_a_crash_or_a_kill_with_growing_bounded_backoff():
    first = decide(-signal.SIGKILL)
    assert first.restart and first.delay_s == 10
    assert "killed by SIGKILL" in first.message and "committed step 10" in first.message
    assert decide(1, committed=20, failed_at=10, restarts=1).delay_s == 20
    assert decide(1, committed=30, failed_at=20, restarts=2).delay_s == 25


def test_a_failure_with_no_new_committed_step_since_the_last_restart_stops_with_the_error():
    tail = "relay | step 3/6\nrelay: unexpected error: RuntimeError: CUDA error: an illegal memory access\n"
    d = decide(1, committed=10, failed_at=10, restarts=1, tail=tail)
    assert not d.restart
    assert "no new committed step" in d.message and "CUDA error" in d.message


def test_the_bound_holds_even_with_progress():
    assert not decide(1, committed=40, failed_at=30, restarts=3).restart


def test_a_refused_lease_or_a_requested_stop_is_not_restarted():
    from runner.errors import EXIT_REFUSED, CredentialsError, LeaseHeld, LeaseLost, exit_code_for

    refusals = [
        LeaseHeld("colab:x", "", 3.0),
        LeaseLost("colab:y", "", 1.0),
        CredentialsError("no Google Drive credentials found"),
    ]
    assert {exit_code_for(e) for e in refusals} == {EXIT_REFUSED}  # by its code, not by matching the message
    assert not decide(EXIT_REFUSED).restart and "refused" in decide(EXIT_REFUSED).message
    assert decide(1, tail="relay: error: a CUDA error that says another session is training this run").restart
    assert not decide(-signal.SIGTERM, stop=True).restart


def test_events_round_trip_through_the_log_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "events.jsonl"
    log = ev.EventLog(path)
    sent = [ev.SessionStarted("tiny", "local", "cpu", 0, 6, None, ({"session": 1},)),
            ev.StepDone(1, 6, 0.5, 1e-2, 0.7), ev.TrainerRestarted(1, -9, 4, 10.0, "why")]  # fmt: skip
    for event in sent:
        log(event)
    with open(path, "a") as f:
        f.write('{"type": "StepDone", "st')  # a writer killed mid-line
    records, offset = ev.read_records(path)
    assert list(ev.iter_events(records)) == sent
    assert ev.read_records(path, offset) == ([], offset)
    assert ev.from_record({"type": "FromTheFuture", "x": 1}) is None


def test_only_the_leading_rank_writes_the_log(tmp_path):
    assert ev.default_subscribers({}) == []
    assert ev.default_subscribers({ev.ENV_EVENTS_LOG: str(tmp_path / "e"), "RANK": "1"}) == []
    assert len(ev.default_subscribers({ev.ENV_EVENTS_LOG: str(tmp_path / "e")})) == 1


def test_the_same_run_in_two_storages_has_two_local_folders(tmp_path):
    env = {"RELAY_HOME": str(tmp_path)}
    a, b = run_dir_for("tiny", "/a", env), run_dir_for("tiny", "gdrive://My Drive/relay", env)
    assert a.root != b.root and a.root.parent == b.root.parent == tmp_path / "runs"
    assert run_dir_for("tiny", "/a/", env) == a


@pytest.mark.parametrize(
    ("profile", "run"),
    [("sdxl-naruto-t4", "sdxl-naruto"), ("sdxl-naruto-kaggle-2xt4", "sdxl-naruto"), ("sdxl-naruto-t4-512", None),
     ("tiny", "tiny")],
)  # fmt: skip
def test_every_side_names_a_shipped_profiles_run_as_the_trainer_stores_it(profile, run, tmp_path):
    """The trainer stores a run under the profile's run key (profiles of one job share it); the detached
    supervisor, the notebook cell, `relay attach`/`stop` and the chain must look there, not under the
    profile's name."""
    from runner.context import Options, build_context
    from runner.env import Env
    from runner.profile import load_profile
    from runner.runinfo import identify_run, run_identity

    storage = str(tmp_path / "store")
    expected = load_profile(profile).run or profile
    assert run is None or expected == run
    ctx = build_context(Options(profile=profile, storage=storage, workdir=str(tmp_path / "w")),
                        env=Env(platform="local", tier="local", host="h", workdir=str(tmp_path / "w")))  # fmt: skip
    assert ctx.run == expected  # where the trainer writes
    assert daemon.identify(["--profile", profile, "--storage", storage], {})[0] == expected
    assert identify_run(profile) == run_identity(load_profile(profile)) == expected
    assert daemon.identify(["--profile", profile, "--storage", storage, "--run", "mine"], {})[0] == "mine"


def test_relay_stop_finds_a_run_by_its_profile(tmp_path, capsys, monkeypatch):
    """`relay stop --profile sdxl-naruto-t4` looks in the folder of run sdxl-naruto."""
    from runner.flags import build_parser

    monkeypatch.setenv("RELAY_HOME", str(tmp_path))
    rundir = run_dir_for("sdxl-naruto", "/s", {"RELAY_HOME": str(tmp_path)})
    rundir.root.mkdir(parents=True)
    rundir.write_state(run="sdxl-naruto", storage="/s", phase="ended", exit_code=0)
    args = build_parser().parse_args(["stop", "--profile", "sdxl-naruto-t4", "--storage", "/s"])
    assert daemon.command(args) == 1  # found the ended run (nothing live to stop), not "no detached run"
    assert f"no live run in {rundir.root}" in capsys.readouterr().err
