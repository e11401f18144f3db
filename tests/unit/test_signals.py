"""Signals: SIGTERM / first Ctrl-C finish the step, commit and exit 75; a second Ctrl-C
leaves at once without committing; previous handlers come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from runner.errors import EXIT_PREEMPTED, Interrupted
from runner.signals import StopFlag, install_stop_handlers

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# A miniature session: steps that take STEP_S seconds, a check of the flag between
# steps, a "commit" when asked to stop, and the exit codes session.py uses.
CHILD = r"""
import sys, time
from runner.errors import EXIT_PREEMPTED, Interrupted
from runner.signals import install_stop_handlers

step_s = float(sys.argv[1])
try:
    with install_stop_handlers() as stop:
        step = 0
        while True:
            print(f"start {step}", flush=True)
            end = time.monotonic() + step_s
            while time.monotonic() < end:
                time.sleep(0.01)
            print(f"done {step}", flush=True)
            step += 1
            if stop.requested:
                print(f"committed {step} {stop.reason}", flush=True)
                sys.exit(EXIT_PREEMPTED)
except Interrupted:
    print("aborted", flush=True)
    sys.exit(EXIT_PREEMPTED)
"""


def start_child(step_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(step_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_line(child: subprocess.Popen, wanted: str, lines: list[str]) -> None:
    for line in iter(child.stdout.readline, ""):
        lines.append(line.strip())
        if line.strip() == wanted:
            return
    raise AssertionError(f"child ended before printing {wanted!r}: {lines}")


def test_sigterm_finishes_the_step_commits_and_exits_75():
    child = start_child(0.5)
    lines: list[str] = []
    wait_for_line(child, "start 1", lines)  # mid-step
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=20)
    assert child.returncode == EXIT_PREEMPTED, err
    assert out.splitlines() == ["done 1", "committed 2 SIGTERM"]  # the step in progress finished, no other began


def test_first_ctrl_c_also_stops_after_the_step():
    child = start_child(0.5)
    lines: list[str] = []
    wait_for_line(child, "start 0", lines)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=20)
    assert child.returncode == EXIT_PREEMPTED, err
    assert out.splitlines() == ["done 0", "committed 1 SIGINT"]


def test_second_ctrl_c_leaves_at_once_without_committing():
    child = start_child(60.0)  # a step far longer than the test waits
    lines: list[str] = []
    wait_for_line(child, "start 0", lines)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=20)
    assert time.monotonic() - sent < 10
    assert child.returncode == EXIT_PREEMPTED, err
    assert out.splitlines() == ["aborted"]  # no "done", no "committed"


def test_flag_rules_in_process_and_handlers_restored():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with install_stop_handlers() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and not stop.stop_now and stop.reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM never escalates
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.stop_now and stop.reason == "SIGTERM"  # the first reason is kept
        with pytest.raises(Interrupted, match="nothing new was committed"):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.stop_now
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


def test_handlers_restored_when_the_block_raises():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), install_stop_handlers():
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_the_flag_works_unhooked():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[StopFlag] = []

    def worker() -> None:
        with install_stop_handlers() as stop:
            seen.append(stop)
            assert signal.getsignal(signal.SIGTERM) is before

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen and not seen[0].requested
