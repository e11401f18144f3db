"""The detached trainer: a supervisor in its own process session, and the views that follow it.

Owns: `relay train --detach` (start a supervisor that outlives the terminal or notebook cell that
started it), the supervisor loop (run `python -m runner train …` as a child; restart it after an
unexpected failure from the last committed checkpoint, with backoff and a bound), `relay attach`
(the live dashboard, rebuilt from the run's events log), `relay stop` (checkpoint and stop: the
trainer's SIGTERM handling, exit 75). The local run folder that ties them together is
runner.rundir's.

Restart policy (`decide`, pure): never after exit 0 (done), 2 (bad input, a refused resume), 3 (refused:
another session holds the run, or the credentials were refused) or 75 (session over, or asked to stop),
by the exit code alone (runner/errors.py), never by matching messages; a failure that repeats with
no new committed step in between stops with a message instead of looping.

Must not: import torch, or edit what the trainer does: the trainer is the unchanged `relay train`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import events as ev
from runner.errors import EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED, EXIT_REFUSED, EXIT_USAGE, UsageError
from runner.rundir import (
    PHASE_ENDED,
    PHASE_RESTARTING,
    PHASE_RUNNING,
    PHASE_STARTING,
    RunDir,
    pid_alive,
    run_dir_for,
    runs_home,
)
from runner.secretfile import hand_over, take_over

log = logging.getLogger(__name__)

ENV_BACKOFF = "RELAY_RESTART_BACKOFF_S"  # the first restart's delay in seconds (tests shorten it)
# Done, bad input, session over, or refused (another session holds the run, or the store refused the
# credentials: runner/errors.py EXIT_REFUSED): restarting cannot help, the user must act first.
NO_RESTART_CODES = (EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED, EXIT_REFUSED)
LOG_TAIL_BYTES = 4096


@dataclass(frozen=True)
class Policy:
    """How the supervisor restarts a failed trainer."""

    max_restarts: int = 5
    """Restarts per detached start, whatever their cause."""
    backoff_s: float = 10.0
    """Delay before the first restart; doubled for each further one."""
    backoff_max_s: float = 120.0
    """Longest delay between restarts."""


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float = 0.0
    message: str = ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {
        EXIT_OK: "target reached",
        EXIT_USAGE: "bad input",
        EXIT_PREEMPTED: "session over (run it again)",
        EXIT_REFUSED: "refused (another session holds the run, or the credentials were refused)",
    }.get(code, f"exit {code}")


def decide(
    code: int, *, committed_step: int, failed_at_step: int | None, restarts: int, policy: Policy,
    log_tail: str = "", stop_requested: bool = False,
) -> Decision:  # fmt: skip
    """Whether to restart a trainer that exited with `code`. Pure.

    `committed_step`: the run's newest committed step now; `failed_at_step`: the committed step at the
    previous failure (None: no earlier failure in this start)."""
    if code in NO_RESTART_CODES or stop_requested:
        return Decision(False, message=f"trainer ended: {describe_exit(code)}")
    last_line = _last_error_line(log_tail)
    if failed_at_step is not None and committed_step <= failed_at_step:
        return Decision(False, message=(
            f"the trainer failed again ({describe_exit(code)}) with no new committed step since the last "
            f"restart (still step {committed_step}); not restarting, fix the cause and run again"
            + (f": {last_line}" if last_line else "")
        ))  # fmt: skip
    if restarts >= policy.max_restarts:
        return Decision(False, message=f"the trainer failed {restarts + 1} times; not restarting again")
    delay = min(policy.backoff_max_s, policy.backoff_s * 2**restarts)
    why = f"trainer {describe_exit(code)}" + (f" ({last_line})" if last_line else "")
    return Decision(True, delay, f"{why}; restarting from committed step {committed_step} in {delay:.0f} s")


def _last_error_line(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "killed" in line.lower():
            return line[:300]
    return ""


def identify(train_argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, str]:
    """(run name, storage URL) of `relay train` arguments, as the trainer will see them."""
    from runner.flags import build_parser
    from runner.runinfo import identify_run

    args = build_parser().parse_args(["train", *train_argv])
    return identify_run(args.profile, args.run, args.overrides), args.storage


# ---------------------------------------------------------------- starting, stopping


def start(train_argv: Sequence[str], env: Mapping[str, str]) -> RunDir:
    """Start a supervisor for `relay train TRAIN_ARGV` in its own process session; return its run folder.

    The supervisor survives the terminal, the notebook cell or the kernel that started it."""
    run, storage = identify(train_argv, env)
    rundir = run_dir_for(run, storage, env)
    if rundir.is_live():
        raise UsageError(
            f"run {run!r} is already training on this machine (pid {rundir.read_state().get('trainer_pid')})",
            hint="follow it with relay attach, or stop it with relay stop",
        )
    rundir.root.mkdir(parents=True, exist_ok=True)
    for path in (rundir.events, rundir.trainer_log, rundir.state_file):
        path.unlink(missing_ok=True)  # a new start: its views begin empty
    argv = [*train_argv, *([] if "--plain" in train_argv else ["--plain"])]
    rundir.write_state(phase=PHASE_STARTING, run=run, storage=storage, argv=argv, restarts=0,
                       started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    with open(rundir.supervisor_log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner.daemon", str(rundir.root), *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=hand_over(env, str(rundir.root)),
            start_new_session=True, close_fds=True,  # secrets through a 0600 file, not its /proc/PID/environ
        )  # fmt: skip
    rundir.write_state(supervisor_pid=proc.pid)
    return rundir


def stop(rundir: RunDir) -> bool:
    """Ask a live run to checkpoint and stop (SIGTERM; the trainer exits 75). False if nothing was running."""
    state = rundir.read_state()
    for key in ("supervisor_pid", "trainer_pid"):  # the supervisor forwards it and will not restart
        pid = state.get(key)
        if state.get("phase") != PHASE_ENDED and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            return True
    return False


# ---------------------------------------------------------------- the supervisor


@dataclass
class Supervisor:
    rundir: RunDir
    argv: list[str]
    env: Mapping[str, str]
    policy: Policy = dataclasses.field(default_factory=Policy)
    sleep: Callable[[float], None] = time.sleep
    stop_requested: bool = False
    trainer: subprocess.Popen | None = None

    def emit(self, event: ev.Event) -> None:
        self._end_partial_line()
        ev.EventLog(self.rundir.events)(event)

    def run(self) -> int:
        restarts, failed_at = 0, None
        while True:
            code = self._run_trainer()
            committed = self.rundir.committed_step()
            decision = decide(code, committed_step=committed, failed_at_step=failed_at, restarts=restarts,
                              policy=self.policy, log_tail=self._log_tail(), stop_requested=self.stop_requested)  # fmt: skip
            if not decision.restart:
                if code not in NO_RESTART_CODES and not self.stop_requested:
                    self.emit(ev.Warning(decision.message, kind="supervisor"))
                self.emit(ev.TrainerExited(code, restarts, decision.message))
                self.rundir.write_state(phase=PHASE_ENDED, exit_code=code, message=decision.message, trainer_pid=None)
                return code
            restarts, failed_at = restarts + 1, committed
            self.emit(ev.Warning(decision.message, kind="restart"))
            self.emit(ev.TrainerRestarted(restarts, code, committed, decision.delay_s, decision.message))
            self.rundir.write_state(phase=PHASE_RESTARTING, restarts=restarts, message=decision.message)
            self.sleep(decision.delay_s)
            if self.stop_requested:
                self.emit(ev.TrainerExited(EXIT_PREEMPTED, restarts, "stopped while waiting to restart"))
                self.rundir.write_state(phase=PHASE_ENDED, exit_code=EXIT_PREEMPTED, trainer_pid=None)
                return EXIT_PREEMPTED

    def on_signal(self, signum, _frame) -> None:
        self.stop_requested = True
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.send_signal(signal.SIGTERM)

    def _run_trainer(self) -> int:
        env = hand_over({**self.env, ev.ENV_EVENTS_LOG: str(self.rundir.events), "PYTHONUNBUFFERED": "1"},
                        str(self.rundir.root))  # fmt: skip
        with open(self.rundir.trainer_log, "ab") as out:
            self.trainer = subprocess.Popen([sys.executable, "-m", "runner", "train", *self.argv], stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            self.rundir.write_state(phase=PHASE_RUNNING, trainer_pid=self.trainer.pid, supervisor_pid=os.getpid())
            while True:
                try:
                    return self.trainer.wait()
                except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                    continue

    def _log_tail(self) -> str:
        try:
            with open(self.rundir.trainer_log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _end_partial_line(self) -> None:
        """A trainer killed mid-write leaves half a line: end it, so the next event stays readable."""
        try:
            with open(self.rundir.events, "rb+") as f:
                if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")
        except FileNotFoundError:
            pass


def policy_from_env(env: Mapping[str, str]) -> Policy:
    backoff = env.get(ENV_BACKOFF, "")
    return Policy(backoff_s=float(backoff)) if backoff else Policy()


def supervise_main(argv: Sequence[str]) -> int:
    """`python -m runner.daemon RUN_DIR TRAIN_ARGS…`: the detached supervisor's entry point."""
    rundir, train_argv = RunDir(Path(argv[0])), list(argv[1:])
    take_over(os.environ)  # the secrets daemon.start handed over, in this process only
    sup = Supervisor(rundir, train_argv, dict(os.environ), policy_from_env(os.environ))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, sup.on_signal)
    try:
        return sup.run()
    except Exception as exc:  # the boundary: the supervisor's own failure is recorded where views look
        log.exception("supervisor failed")
        rundir.write_state(phase=PHASE_ENDED, exit_code=EXIT_ERROR, message=f"supervisor failed: {exc}")
        return EXIT_ERROR


# ---------------------------------------------------------------- following a run


def follow(
    rundir: RunDir, on_event: Callable[[ev.Event], None], *, poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep, on_poll: Callable[[], None] | None = None,
) -> int:  # fmt: skip
    """Feed every event of the run's log to `on_event`, old ones first, until the supervisor is done;
    return the trainer's last exit code. KeyboardInterrupt passes through (the run goes on)."""
    offset, gone_polls = 0, 0
    while True:
        records, offset = ev.read_records(rundir.events, offset)
        for event in ev.iter_events(records):
            if isinstance(event, ev.TrainerExited):
                return event.exit_code
            on_event(event)
        if records:
            continue  # drain the log before looking at the processes
        state = rundir.read_state()
        if state.get("phase") == PHASE_ENDED:
            return int(state.get("exit_code", EXIT_ERROR))
        gone_polls = 0 if rundir.is_live() else gone_polls + 1
        if gone_polls > 4:  # no process left and no final record: the supervisor itself was killed
            return EXIT_ERROR
        if on_poll is not None:
            on_poll()
        sleep(poll_s)


def attach(rundir: RunDir, *, plain: bool = False, env: Mapping[str, str] | None = None) -> int:
    """`relay attach`: the dashboard of a live (or the last) detached run; Ctrl-C leaves it running."""
    from runner.clock import SystemClock
    from runner.dashboard import Dashboard

    env = dict(os.environ) if env is None else env
    with Dashboard.for_terminal(SystemClock(), plain=plain, env=env) as dash:
        try:
            code = follow(rundir, dash.on_event)
        except KeyboardInterrupt:
            print("relay: detached from the view; the run goes on (relay attach to follow, relay stop to stop it)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_OK
    message = rundir.read_state().get("message", "")
    if message:
        print(f"relay: {message}", file=sys.stderr)
    return code


def find_run_dir(run: str | None, storage: str | None, env: Mapping[str, str]) -> RunDir:
    """The run folder named by run/storage; with neither, the most recently started one on this machine."""
    if run and storage:
        return run_dir_for(run, storage, env)
    candidates = [RunDir(p) for p in runs_home(env).glob("*") if (p / "state.json").exists()]
    candidates = [c for c in candidates if (not run or c.read_state().get("run") == run)
                  and (not storage or c.read_state().get("storage") == storage)]  # fmt: skip
    if not candidates:
        raise UsageError(f"no detached run on this machine{f' named {run!r}' if run else ''}",
                         hint="start one with relay train --detach …")  # fmt: skip
    live = [c for c in candidates if c.is_live()]
    return max(live or candidates, key=lambda c: c.state_file.stat().st_mtime)


def command(args) -> int:
    """The CLI's `train --detach`, `attach` and `stop`."""
    env = dict(os.environ)
    if args.command == "train":
        argv = list(args.argv)
        train_argv = [a for a in argv[argv.index("train") + 1 :] if a != "--detach"]
        rundir = start(train_argv, env)
        print(f"relay: training in the background ({rundir.root}); "
              "relay attach to follow, relay stop to stop it")  # fmt: skip
        return EXIT_OK
    run = args.run
    if not run and getattr(args, "profile", None):
        from runner.runinfo import identify_run

        run = identify_run(args.profile)
    rundir = find_run_dir(run, args.storage, env)
    if args.command == "attach":
        return attach(rundir, plain=args.plain, env=env)
    if not stop(rundir):
        print(f"relay: no live run in {rundir.root}", file=sys.stderr)
        return EXIT_ERROR
    print("relay: asked the run to checkpoint and stop; relay attach shows when it has", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(supervise_main(sys.argv[1:]))
