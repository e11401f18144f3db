"""A Kaggle session cut short after a few steps: `python -m tests.platforms.kaggle_api.short_session N -- RELAY ARGS`.

Runs `relay RELAY ARGS` in this process with the budget's stop decision replaced: the session
stops (and commits its final checkpoint, exit 75) once it has trained N steps, or at the target.
That is what a real session's time limit does, without depending on this machine's speed.
A Kaggle VM boots for each run, and Relay reads the session's start from /proc/uptime; here
/proc/uptime is the test machine's, so the VM's boot is the run's start (RELAY_TEST_VM_BOOT_WALL,
set by the stand-in server). The session's first step is the newest committed checkpoint in the
local storage folder.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def committed_step(storage: Path, run: str) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in (storage / run / "checkpoints").glob("step-*/COMMIT.json")]
    return max(steps, default=0)


def main(argv: list[str]) -> int:
    per_session, relay_args = int(argv[0]), argv[argv.index("--") + 1 :]
    storage = Path(relay_args[relay_args.index("--storage") + 1])
    target = next(int(a.split("=")[1]) for a in relay_args if a.startswith("train.steps="))
    stop_at = committed_step(storage, "tiny") + per_session

    from runner import budget, env
    from runner.cli import main as relay

    if "RELAY_TEST_VM_BOOT_WALL" in os.environ:
        boot = float(os.environ["RELAY_TEST_VM_BOOT_WALL"])
        env.read_uptime_s = lambda read: time.time() - boot

    def should_stop(ctx) -> bool:  # steps done = target - steps_left
        return ctx.steps_left == 0 or target - ctx.steps_left >= stop_at

    budget.should_stop = should_stop
    return relay(relay_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
