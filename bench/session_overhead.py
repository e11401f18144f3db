"""The session loop's own time per step: what `relay train` does around each `Trainer.step` (stop and budget
decisions, the step event, the dashboard, TensorBoard scalars, heartbeats), measured on the tiny profile.

`relay bench` times the Trainer's step against a bare UNet step; this measures the rest of the loop, which
runs between steps while the GPU waits, so the figure adds to every step whatever the GPU. Checkpoints and
the end of the run (final export, sample grid) are timed apart (a checkpoint's blocking part is in
bench/RESULTS.md); the dashboard's rendering is reported as it
stands: in the live view it runs on its own thread.

    python3 bench/session_overhead.py [STEPS]      (prints one line per dashboard mode)
"""

from __future__ import annotations

import functools
import io
import sys
import tempfile
import time
from contextlib import redirect_stdout

from rich.console import Console

import runner.dashboard
from runner import caches, cli, session
from runner.train import run as train_run


def timed(owner: type, name: str, totals: dict[str, float], active: list[str]) -> None:
    """Add the time of owner.name to totals[name]; a call inside another timed one (bar the loop) is not
    counted again (the final checkpoint inside _end)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nested = any(n != "_loop" for n in active)
        active.append(name)
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            active.pop()
            if not nested:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def measure(steps: int, live: bool) -> dict[str, float]:
    totals: dict[str, float] = {}
    # timed apart: not per-step work
    apart = {"_checkpoint": session.Session, "_sample": session.Session, "_end": session.Session,
             "store_compile_cache": caches.SessionCaches}  # fmt: skip
    owners = {"_loop": session.Session, **apart}
    originals = {n: getattr(owner, n) for n, owner in owners.items()}
    step = train_run.TrainingRun.step
    active: list[str] = []
    for name, owner in owners.items():
        timed(owner, name, totals, active)
    timed(train_run.TrainingRun, "step", totals, active)
    terminal = functools.partial(Console, force_terminal=True, width=100, file=io.StringIO())
    console_class, runner.dashboard.Console = runner.dashboard.Console, terminal if live else Console
    dashboards = []
    for_terminal = runner.dashboard.Dashboard.for_terminal.__func__

    def keep(cls, *args, **kwargs):
        dash = for_terminal(cls, *args, **kwargs)
        dashboards.append(dash)
        return dash

    runner.dashboard.Dashboard.for_terminal = classmethod(keep)
    try:
        with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
            argv = ["train", "--profile", "tiny", "--storage", f"{tmp}/s", "--workdir", f"{tmp}/w",
                    "--set", f"train.steps={steps}", "--set", "checkpoint.every_min=1000", "--set", "sample.every_steps=0"]  # fmt: skip
            code = cli.main(argv if live else [*argv, "--plain"])
    finally:
        for name, fn in originals.items():
            setattr(owners[name], name, fn)
        train_run.TrainingRun.step = step
        runner.dashboard.Console = console_class
        runner.dashboard.Dashboard.for_terminal = classmethod(for_terminal)
    if code != 0:
        raise SystemExit(f"relay train exited {code}")
    around = totals["_loop"] - totals["step"] - sum(totals.get(n, 0.0) for n in apart)
    return {
        "steps": steps,
        "loop_ms_per_step": 1e3 * around / steps,
        "trainer_step_ms": 1e3 * totals["step"] / steps,
        "render_ms_total": 1e3 * dashboards[0].render_seconds_total if dashboards else float("nan"),
        "live": dashboards[0].live if dashboards else None,
    }


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for live in (False, True):
        r = measure(steps, live)
        print(f"dashboard {'live' if r['live'] else 'plain'}: the loop around the step {r['loop_ms_per_step']:.2f} ms/step "
              f"over {r['steps']} steps (the tiny Trainer step itself {r['trainer_step_ms']:.1f} ms); "
              f"dashboard rendering {r['render_ms_total']:.0f} ms in all")  # fmt: skip


if __name__ == "__main__":
    main()
