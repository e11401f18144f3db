"""Out of memory during `relay train` (tiny profile, CPU, a fake OOM raised as torch raises it).

A session whose step runs out of memory backs off and finishes; one whose step never fits ends with a
clear message and exit 1, no traceback, and the checkpoints it committed before intact.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from runner.train.loop import Trainer
from tests.e2e.conftest import RUN, broken_commits, relay_main, sessions, train_args, verified_steps

AUTO = ('train.gradient_checkpointing="auto"',)
SLOW_STEP_S = 0.5  # a checkpoint is due every 6 s of training (2 s prior cost, 50 % overhead cap): make 16 steps ≥ 8 s


@pytest.fixture
def oom_from_call(monkeypatch):
    """Make every micro-batch from the `start`-th on (0-based) raise torch's OutOfMemoryError while `still(trainer)`."""
    rule = {"start": 10**9, "still": lambda trainer: True, "sleep_s": 0.0}
    calls = []
    real = Trainer._micro

    def micro(self, batch, reduce=False):
        calls.append(self.gradient_checkpointing)
        time.sleep(rule["sleep_s"])
        if len(calls) > rule["start"] and rule["still"](self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real(self, batch, reduce)

    monkeypatch.setattr(Trainer, "_micro", micro)
    return rule, calls


def test_an_oom_that_checkpointing_fixes_is_backed_off_and_the_run_completes(tmp_path, oom_from_call, capsys):
    rule, calls = oom_from_call
    rule["start"], rule["still"] = 3, lambda trainer: not trainer.gradient_checkpointing
    code = relay_main(train_args(tmp_path / "s", tmp_path / "w", extra=AUTO))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "out of memory at step 3" in out.out + out.err
    assert calls[:5] == [False, False, False, False, True]  # step 3 failed once, then ran with checkpointing
    assert all(calls[4:])  # and never went back up
    assert (tmp_path / "s" / RUN / "final").is_dir()


def test_an_oom_nothing_fixes_ends_with_a_clear_error_and_the_checkpoints_intact(tmp_path, oom_from_call, capsys):
    rule, calls = oom_from_call
    rule["start"], rule["sleep_s"] = 16, SLOW_STEP_S  # steps 0-15 train, some are checkpointed; step 16 never fits
    code = relay_main(train_args(tmp_path / "s", tmp_path / "w", steps=20, extra=AUTO))
    out = capsys.readouterr()
    done = subprocess.CompletedProcess([], code, out.out, out.err)
    assert done.returncode == 1, out.err[-3000:]
    assert "Traceback" not in out.err + out.out
    assert "does not fit this GPU's free memory even at the lowest plan" in out.err
    assert "resolution" in out.err  # what to change
    assert len(calls) == 18  # 16 steps, then step 16 once without and once with checkpointing: no loop
    run_dir = tmp_path / "s" / RUN
    assert verified_steps(run_dir) and max(verified_steps(run_dir)) <= 16 and not broken_commits(run_dir)
    assert sessions(run_dir)[-1]["reason"] == "error"
