"""The dashboard shows what a user watches for, in both views, without slowing training."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import sys
import time
import warnings

import pytest
from rich.console import Console

from runner import events as ev
from runner.clock import FakeClock
from runner.dashboard import Dashboard, should_use_live
from runner.dashview import plain_line, render, sparkline
from runner.errors import DataError, LeaseHeld, ResumeMismatch, StorageError
from runner.snapshot import Snapshot, apply

HOUR = 3600.0


def make_console(force_terminal: bool = True) -> Console:
    return Console(file=io.StringIO(), width=100, force_terminal=force_terminal, color_system=None)


def text_of(renderable) -> str:
    console = make_console()
    console.print(renderable)
    return console.file.getvalue()


def step(n: int, *, loss: float = 0.1, step_s: float = 2.0, target: int = 2000, **kw) -> ev.StepDone:
    return ev.StepDone(step=n, target=target, loss=loss, lr=1e-4, step_s=step_s, **kw)


def started(step_: int = 100, deadline_s: float | None = 4 * HOUR, history: tuple = ()) -> ev.SessionStarted:
    return ev.SessionStarted(
        run="naruto", platform="colab", gpu="Tesla T4", step=step_, target=2000, deadline_s=deadline_s, history=history
    )


def run_events(events: list[ev.Event], now: float = 0.0) -> Snapshot:
    snapshot = Snapshot()
    for e in events:
        snapshot = apply(snapshot, e, now)
    return snapshot


def test_render_shows_progress_loss_pace_and_eta():
    s = run_events([started(), *(step(n, loss=0.2 - n / 10_000) for n in range(101, 121))])
    out = text_of(render(s, now=0.0))
    assert "step 120 / 2000 (6.0%)" in out
    # 1880 steps left × 2 s = 1.04 h, inside the 4 h left of this session
    assert "ETA 1 h 03 min · this session" in out
    assert "0.50 steps/s · 2.00 s/step" in out
    assert "loss 0.1880" in out
    assert "━" in out  # the progress bar


def test_eta_counts_sessions_when_the_run_outlasts_this_one():
    # 1900 steps × 30 s = 15 h 50 min; 4 h left now, 12 h sessions → this one + 1 more = 2 sessions
    clock = FakeClock()
    dash = Dashboard(make_console(), clock, live=False)
    dash.on_event(started())
    dash.on_event(step(100, step_s=30.0))
    dash.snapshot = dataclasses.replace(dash.snapshot, session_length_s=12 * HOUR)
    dash.on_event(ev.BudgetUpdated(time_left_s=4 * HOUR, next_checkpoint_in_s=None))
    assert "ETA 15 h 50 min · about 2 sessions" in text_of(render(dash.snapshot, clock.monotonic()))


def test_sparkline_tracks_the_loss_shape():
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▅▅"
    assert sparkline([]) == ""


def test_loss_ema_smooths_and_history_is_bounded():
    s = run_events([step(n, loss=1.0 if n % 2 else 0.0) for n in range(1, 501)])
    assert len(s.losses) == 40
    assert 0.3 < s.loss_ema < 0.7


def test_checkpoint_upload_validation_and_memory_are_shown():
    s = run_events([started(), step(150, vram_used_gib=10.24, vram_peak_gib=11.5)])
    s = apply(s, ev.CheckpointCommitted(step=140, bytes=120_000_000, upload_s=12.0), now=60.0)
    s = apply(s, ev.UploadProgress(step=150, done_bytes=30_000_000, total_bytes=120_000_000, rate_bps=5e6), now=70.0)
    s = apply(s, ev.Validated(step=150, val_loss=0.1234), now=70.0)
    out = text_of(render(s, now=100.0))
    assert "step 140 · 120.0 MB in 12 s · 40 s ago" in out
    assert "step 150: 30.0 MB / 120.0 MB (25%) at 5.0 MB/s" in out
    assert "val loss 0.1234 at step 150" in out
    assert "10.2 GiB · peak 11.5 GiB" in out
    # the upload in flight is done once that step commits
    s = apply(s, ev.CheckpointCommitted(step=150, bytes=120_000_000, upload_s=20.0), now=110.0)
    assert s.upload is None and s.checkpoint_step == 150


def test_budget_counts_down_from_when_the_session_set_it():
    clock = FakeClock()
    dash = Dashboard(make_console(), clock, live=False)
    dash.on_event(started())
    clock.advance(100.0)
    dash.on_event(ev.BudgetUpdated(time_left_s=2 * HOUR, next_checkpoint_in_s=600.0))
    clock.advance(120.0)
    out = text_of(render(dash.snapshot, clock.monotonic()))
    assert "session left 1 h 58 min · next checkpoint in 8 min" in out


def test_a_dashboard_replayed_from_the_events_log_shows_the_budget(tmp_path):
    """relay attach and the notebook cell draw from the trainer's events log, not from the session."""
    log = ev.EventLog(tmp_path / "events.jsonl")
    for event in (started(), step(100, step_s=2.0), ev.BudgetUpdated(time_left_s=2 * HOUR, next_checkpoint_in_s=600.0)):
        log(event)
    records, _ = ev.read_records(tmp_path / "events.jsonl")
    clock = FakeClock()
    dash = Dashboard(make_console(), clock, live=False)
    for event in ev.iter_events(records):
        dash.on_event(event)
    clock.advance(60.0)
    assert "session left 1 h 59 min · next checkpoint in 9 min" in text_of(render(dash.snapshot, clock.monotonic()))


def test_warnings_keep_counts_and_the_latest_message_per_kind():
    events = [ev.Warning(message=f"unreadable image {i}.png", kind="skipped-images") for i in range(3)]
    events += [step(5, skipped=True, loss=float("nan")), ev.Warning(message="retry 2/5: HTTP 503", kind="retry")]
    events += [ev.Warning(message=f"w{i}", kind=f"k{i}") for i in range(4)]
    s = run_events(events)
    kinds = [w.kind for w in s.warnings]
    assert kinds == ["retry", "k0", "k1", "k2", "k3"]  # the last five kinds, most recent last
    s = run_events(events[:4])
    out = text_of(render(s, now=0.0))
    assert "skipped-images ×3: unreadable image 2.png" in out
    assert "nan ×1: non-finite loss at step 5: update skipped" in out
    assert s.skipped_steps == 1


def test_session_history_lists_earlier_sessions_and_this_one():
    history = ({"platform": "kaggle", "gpu": "T4 x2", "step_from": 0, "step_to": 100, "reason": "budget"},)
    s = run_events([started(history=history), step(130)])
    s = apply(s, ev.SessionEnded(step=130, target=2000, reason="signal", exit_code=75))
    out = text_of(render(s, now=0.0))
    assert "#1 kaggle T4 x2 · steps 0→100 · budget" in out
    assert "#2 colab Tesla T4 · steps 100→130 · signal (exit 75)" in out


def test_plain_line_format():
    s = run_events([started(), step(120, vram_used_gib=10.2, vram_peak_gib=11.0)])
    s = apply(s, ev.CheckpointCommitted(step=100, bytes=1, upload_s=1.0))
    assert plain_line(s, now=60.0) == (
        "relay | step 120/2000 (6.0%) | loss 0.1000 · ema 0.1000 | 0.50 steps/s · 2.00 s/step"
        " | ETA 1 h 03 min · this session | vram 10.2 GiB · peak 11.0 GiB | ckpt step 100 | session left 3 h 59 min"
    )


def test_plain_line_before_the_session_starts_and_after_it_ends():
    s = apply(Snapshot(), ev.Planned(micro_batch=1, grad_accum=4, gradient_checkpointing=False))
    assert plain_line(s, now=0.0) == "relay | starting | micro-batch 1 × accum 4, grad checkpointing off"
    s = run_events([started(), step(130), ev.SessionEnded(step=130, target=2000, reason="budget", exit_code=75)])
    assert plain_line(s, now=0.0).endswith("| ended: budget (exit 75)")


def test_plain_mode_prints_every_n_seconds_and_on_important_events():
    clock = FakeClock()
    console = make_console(force_terminal=False)
    dash = Dashboard(console, clock, plain_every_s=30.0)
    assert dash.live is False
    dash.on_event(started())  # important: printed
    for n in range(101, 131):  # 30 steps of 2 s: one periodic line after 30 s
        clock.advance(2.0)
        dash.on_event(step(n))
    dash.on_event(ev.Warning(message="retry 1/5: HTTP 503", kind="retry"))
    dash.on_event(ev.CheckpointCommitted(step=130, bytes=10, upload_s=1.0))
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("relay | step 100/2000")
    assert lines[1].startswith("relay | step 115/2000")  # first line 30 s after the start
    assert lines[2].startswith("relay | step 130/2000")  # 30 s later
    assert lines[3] == "relay | warning (retry): retry 1/5: HTTP 503"
    assert "ckpt step 130" in lines[4]
    assert len(lines) == 5


def test_plain_mode_handles_10000_steps_in_well_under_a_second():
    clock = FakeClock()
    dash = Dashboard(make_console(force_terminal=False), clock, plain_every_s=30.0)
    bus = ev.EventBus()
    dash.attach(bus)
    t0 = time.perf_counter()
    for n in range(1, 10_001):
        clock.advance(0.01)
        bus.emit(step(n, target=10_000))
    elapsed = time.perf_counter() - t0
    assert dash.snapshot.step == 10_000
    assert elapsed < 1.0, f"10,000 events took {elapsed:.2f} s"
    assert dash.render_seconds_total < elapsed


def test_an_earlier_session_left_running_in_the_checkpoint_shows_as_killed():
    history = ({"platform": "colab", "gpu": "Tesla T4", "step_from": 0, "step_to": 100, "reason": "running"},)
    out = text_of(render(run_events([started(history=history), step(101)]), now=0.0))
    assert "#1 colab Tesla T4 · steps 0→100 · killed" in out
    assert "#2 colab Tesla T4 · steps 100→101 · running" in out  # only this session is running


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_live_mode_shows_library_warnings_and_the_stop_acknowledgement_inside_the_panel(capsys):
    """Text written to the terminal under a redrawing panel leaves stale copies of the panel above it."""
    console = make_console()
    library = logging.getLogger("somelibrary")
    handler = logging.StreamHandler(sys.stderr)  # as transformers and diffusers set up their loggers
    library.addHandler(handler)
    library.propagate = False
    showwarning = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with Dashboard(console, FakeClock(), live=True, refresh_per_s=1.0) as dash:
                dash.on_event(started())
                warnings.warn("install the kernels package for faster CPU kernels", UserWarning, stacklevel=1)
                library.warning("TensorBoard is not installed")
                logging.getLogger("runner.signals").warning("interrupted: stopping after this step")
                dash.on_event(step(101))
        assert warnings.showwarning is showwarning and library.handlers == [handler], "not put back"
    finally:
        library.removeHandler(handler)
        library.propagate = True
    captured = capsys.readouterr()
    assert captured.err == captured.out == "", "text reached the terminal outside the panel"
    lines = [line for line in ANSI.sub("", console.file.getvalue()).replace("\r", "\n").splitlines() if line.strip()]
    stray = [line for line in lines if line[0] not in "╭│╰"]
    assert not stray, f"text outside the panel: {stray}"
    out = "\n".join(lines)
    assert "UserWarning ×1: install the kernels package" in out
    assert "somelibrary ×1: TensorBoard is not installed" in out
    assert re.search(r"│ stopping +interrupted: stopping after this step", out), out[-2000:]


@pytest.mark.parametrize(
    ("error", "ended"),
    [
        (DataError("no images", source="data/"), "bad input (exit 2)"),
        (ResumeMismatch({"lora.rank": (4, 8)}), "refused: settings differ from the stored run (exit 2)"),
        (
            LeaseHeld("colab:vm:pid7:abc", "2026-12-01T10:00:00Z", 32.0),
            "refused: another session holds the lease (exit 3)",
        ),
        (StorageError("Drive said 500"), "error (exit 1)"),
        (RuntimeError("boom"), "error (exit 1)"),
    ],
)
@pytest.mark.parametrize("live", [False, True])
def test_a_failed_session_ends_with_the_code_the_command_returns(error, ended, live):
    console = make_console(force_terminal=live)
    with pytest.raises(type(error)):
        with Dashboard(console, FakeClock(), live=live) as dash:
            dash.on_event(started())
            dash.on_event(ev.SessionEnded(step=100, target=2000, reason="running", exit_code=1))  # the session's guess
            raise error
    assert dash.snapshot.ended == ended
    out = console.file.getvalue()
    assert ended in out
    assert "running (exit" not in out and out.count("(exit ") == (1 if not live else out.count(ended))


def test_live_mode_draws_through_rich_live_and_measures_render_time():
    clock = FakeClock()
    console = make_console()
    with Dashboard(console, clock, live=True, refresh_per_s=1.0) as dash:
        dash.on_event(started())
        dash.on_event(step(120))
    assert "step 120 / 2000" in console.file.getvalue()  # the final redraw on stop
    assert dash.render_seconds_total > 0


@pytest.mark.parametrize(
    ("terminal", "env", "expected"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"COLAB_RELEASE_TAG": "x"}, False),  # `!relay train` under Colab: plain lines
        (True, {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, False),
        (True, {"JPY_PARENT_PID": "1"}, False),  # `!relay train` in a local Jupyter or nbclient kernel
    ],
)
def test_live_only_in_a_real_terminal(terminal, env, expected):
    assert should_use_live(make_console(force_terminal=terminal), env) is expected


def test_for_terminal_takes_the_profile_settings_and_honours_plain():
    from runner.profile import load_profile

    profile = load_profile("tiny", ["dashboard.plain_every_s=5", "session.hours=3"])
    dash = Dashboard.for_terminal(FakeClock(), plain=True, profile=profile, console=make_console(), env={})
    assert dash.live is False and dash.plain_every_s == 5.0
    assert dash.snapshot.session_length_s == 3 * HOUR
    assert Dashboard.for_terminal(FakeClock(), console=make_console(), env={}).live is True
    assert "starting…" in text_of(render(Snapshot(), now=0.0))


def test_a_notice_is_printed_but_not_as_a_warning():
    out = io.StringIO()
    dash = Dashboard(Console(file=out, width=120, force_terminal=False), FakeClock(), live=False)
    dash.on_event(ev.Notice("run already complete at step 40; final/ is in storage"))
    assert "relay | run already complete at step 40" in out.getvalue()
    assert "warning" not in out.getvalue() and not dash.snapshot.warnings


def test_a_plain_run_prints_its_ended_line_once():
    out, clock = io.StringIO(), FakeClock()
    dash = Dashboard(Console(file=out, width=200, force_terminal=False), clock, live=False, plain_every_s=1)
    dash.on_event(ev.SessionStarted(run="tiny", platform="local", gpu="cpu", step=0, target=4, deadline_s=None))
    clock.advance(5)
    dash.on_event(ev.SessionEnded(step=4, target=4, reason="completed", exit_code=0))  # printed: its time is due
    dash.on_event(ev.BudgetUpdated(60.0, None))  # the session's last numbers, after the end
    clock.advance(5)
    dash.on_event(ev.TrainerExited(0, 0, "done"))  # a headless notebook cell replays the supervisor's record too
    dash.stop()
    assert out.getvalue().count("ended: completed (exit 0)") == 1, out.getvalue()
