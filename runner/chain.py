"""The hands-off chain: a session that ends with "run me again" starts the next one on Kaggle.

Owns: the chain's decision (`decide`, pure), the facts it reads (`gather_facts`), the push of the
user's own Kaggle notebook (GetKernel, then SaveKernel with the same source, GPU and internet on;
runner/kaggle_api.py) once this session won the successor claim, the decision records, and the entry
points (`python -m runner.chain`, `relay stop --chain`). The run's records under RUN/chain/ (the claim,
the stop flag, `status()`) are runner/chainrecords.py's. The rules and the Kaggle facts behind them are
written out in docs/chain.md; keep the two in step.

Must not: read secrets itself or print them (the kernel side reads the Kaggle secret and
passes `KaggleCredentials` in; a credentials file it writes is 0600), use any account but
the one in those credentials, push anything but the notebook named by the user, or import
torch. kagglesdk is imported lazily, only when a push or a quota question is due.

Called from the kernel side: `begin_session(...)` when the session starts, `after_session(exit_code,
...)` after the trainer exits; or `python -m runner.chain begin|after ...` from notebook cells (`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.chainrecords import (
    CHAIN_DIR,
    COMPLETED,
    LOST_RACE,
    NEEDS_PERSON,
    PUSH_FAILED,
    PUSHED,
    PUSHED_FILE,
    QUEUED,
    QUOTA,
    SESSION_CAP,
    SETTLE_S,
    STOP_FILE,
    STOP_FLAG,
    begin_session,
    claim_successor,
    clear_stop,
    pushed_successors,
    put_json,
    request_stop,
    status,
    successor_dir,
)
from runner.clock import Clock, SystemClock, iso
from runner.errors import EXIT_OK, EXIT_PREEMPTED, CredentialsError, RelayError, UsageError
from runner.kaggle_api import KaggleApi, KaggleApiError, KaggleCredentials, SdkKaggleApi, accelerator_for
from runner.quota import KAGGLE_WEEKLY_GPU_H, kaggle_quota_left_h
from runner.runinfo import identify_run, run_identity

__all__ = [
    "KaggleCredentials",
    "SdkKaggleApi",
    "after_session",
    "begin_session",
    "decide",
    "status",
]  # the kernel side's API

log = logging.getLogger(__name__)

MIN_SESSION_H = 1.0  # below this much weekly GPU quota a session is not worth starting
SESSION_CAP_ERROR = "Maximum batch GPU session count reached"
"""Kaggle's answer to a push while the account already runs its most GPU versions at once (the cap is not
documented; users quote this message, e.g. Kaggle/kaggle-api issues). This session is one of them until it ends."""
CAP_RETRY_WAITS_S = (60.0, 120.0, 240.0)  # bounded: about 7 min, well inside the margin a session keeps


@dataclass(frozen=True)
class ChainFacts:
    """What the decision needs, read from the store and the Kaggle API by `gather_facts`."""

    target_reached: bool
    stop_requested: bool
    quota_left_h: float | None  # None: unknown
    queued_version: int | None = None  # a successor above this session's link was pushed: it is the next session
    min_session_h: float = MIN_SESSION_H


@dataclass(frozen=True)
class ChainDecision:
    """What the chain did (or will do) at the end of a session."""

    action: str  # "push" (continue) or "stop" (this session pushes nothing)
    reason: str  # one of the reason constants above
    message: str
    successor: int | None = None  # the successor's index in RUN/chain/
    version: int | None = None  # the Kaggle version number the push created

    @property
    def continues(self) -> bool:
        return self.action == "push"


def decide(exit_code: int, facts: ChainFacts) -> ChainDecision:
    """Push or stop, from the session's exit code and the facts. Pure."""
    if exit_code == EXIT_OK or facts.target_reached:
        return ChainDecision("stop", COMPLETED, "the run reached its target: the chain ends here")
    if exit_code != EXIT_PREEMPTED:
        return ChainDecision(
            "stop", NEEDS_PERSON, f"the session ended with exit {exit_code}: fix what it reported, then start again"
        )
    if facts.stop_requested:
        return ChainDecision("stop", STOP_FLAG, "`relay stop --chain` was given: no next session")
    if facts.queued_version is not None:
        return ChainDecision(
            "stop", QUEUED, f"version {facts.queued_version} was already pushed as the next session", None,
            facts.queued_version,
        )  # fmt: skip
    if facts.quota_left_h is not None and facts.quota_left_h < facts.min_session_h:
        return ChainDecision(
            "stop", QUOTA,
            f"{facts.quota_left_h:.1f} h of this week's Kaggle GPU quota left (< {facts.min_session_h:g} h): "
            "continue on Colab or after the weekly reset",
        )  # fmt: skip
    return ChainDecision("push", PUSHED, "pushing the next session")


def _record_decision(storage, run: str, clock: Clock, exit_code: int, decision: ChainDecision) -> None:
    now = clock.wall()
    key = f"{run}/{CHAIN_DIR}/decisions/{int(now * 1000):015d}-{uuid.uuid4().hex[:8]}.json"
    try:
        put_json(storage, key, {"at_wall": now, "exit_code": exit_code, **dataclasses.asdict(decision)})
    except RelayError as exc:  # the decision stands; only `relay status` misses it
        log.warning("chain decision not recorded: %s", exc)


# ---------------------------------------------------------------- after a session


def gather_facts(storage, run: str, *, api: KaggleApi | None, clock: Clock, link: int,
                 min_session_h: float = MIN_SESSION_H, quota_h: float = KAGGLE_WEEKLY_GPU_H) -> ChainFacts:  # fmt: skip
    """Read the store (target, stop flag, a successor above `link`, the run's Kaggle hours) and the API's quota."""
    from runner.report import read_status  # noqa: PLC0415 - report imports rich; only needed here

    status = read_status(storage, run)
    queued = [p for p in pushed_successors(storage, run) if p.get("index", 0) > link]
    local_h = kaggle_quota_left_h(status.sessions, clock.wall(), account="", quota_h=quota_h)
    api_h = api.gpu_quota_left_h() if api is not None else None
    return ChainFacts(
        target_reached=status.complete or status.step >= status.target,
        stop_requested=storage.exists(f"{run}/{CHAIN_DIR}/{STOP_FILE}"),
        quota_left_h=min(h for h in (local_h, api_h) if h is not None),
        queued_version=queued[-1].get("version") if queued else None,
        min_session_h=min_session_h,
    )


def after_session(
    exit_code: int, *, storage, run: str, notebook: str, api: KaggleApi, link: int, clock: Clock | None = None,
    gpu_names: Sequence[str] = (), settle_s: float = SETTLE_S, min_session_h: float = MIN_SESSION_H,
) -> ChainDecision:  # fmt: skip
    """Decide, and push the next session where the chain continues; the decision is recorded in RUN/chain/.

    `notebook` is the user's own USER/SLUG; `api` carries the user's own credentials; `link`
    is what `begin_session` returned when this session started.
    """
    clock = clock or SystemClock()
    if exit_code == EXIT_PREEMPTED:
        facts = gather_facts(storage, run, api=api, clock=clock, link=link, min_session_h=min_session_h)
    else:  # the exit code alone decides (a run that never started has nothing to read)
        facts = ChainFacts(target_reached=False, stop_requested=False, quota_left_h=None)
    decision = decide(exit_code, facts)
    if decision.continues:
        decision = _push_successor(storage, run, link + 1, notebook, api, clock, gpu_names, settle_s)
    _record_decision(storage, run, clock, exit_code, decision)
    log.info("chain: %s (%s)", decision.reason, decision.message)
    return decision


def _push_successor(storage, run, index, notebook, api, clock, gpu_names, settle_s) -> ChainDecision:
    claim = claim_successor(storage, run, index, clock, settle_s)
    if claim is None:
        return ChainDecision("stop", LOST_RACE, f"another session is pushing successor {index}", index)
    try:
        metadata, source = api.get_kernel(notebook)
        accelerator = accelerator_for(gpu_names, metadata)
        version = _save_waiting_for_a_slot(api, notebook, metadata, source, accelerator, clock.sleep)
    except KaggleApiError as exc:
        storage.delete(claim)  # a later session may try this successor again
        if SESSION_CAP_ERROR.lower() in str(exc).lower():
            waited = sum(CAP_RETRY_WAITS_S) / 60
            return ChainDecision("stop", SESSION_CAP, (
                f"Kaggle refused the push {len(CAP_RETRY_WAITS_S) + 1} times in {waited:.0f} min: "
                f"{SESSION_CAP_ERROR} (your other GPU versions are running); start the next session by hand "
                "once one of them ends"), index)  # fmt: skip
        return ChainDecision("stop", PUSH_FAILED, f"{exc}: start the next session by hand", index)
    put_json(storage, f"{successor_dir(run, index)}/{PUSHED_FILE}", {
        "index": index, "version": version, "notebook": notebook, "accelerator": accelerator,
        "pushed_wall": clock.wall(), "pushed": iso(clock.wall()),
    })  # fmt: skip
    return ChainDecision("push", PUSHED, f"pushed {notebook} version {version} as session {index + 1}", index, version)


def _save_waiting_for_a_slot(api, notebook, metadata, source, accelerator, sleep) -> int:
    """SaveKernel; while Kaggle answers that the account's GPU sessions are all taken, wait and try again,
    a bounded number of times (CAP_RETRY_WAITS_S), then let the refusal through."""
    for wait_s in (*CAP_RETRY_WAITS_S, None):
        try:
            return api.save_kernel(notebook, metadata, source, accelerator)
        except KaggleApiError as exc:
            if wait_s is None or SESSION_CAP_ERROR.lower() not in str(exc).lower():
                raise
            log.warning("chain: %s; trying again in %.0f s", SESSION_CAP_ERROR, wait_s)
            sleep(wait_s)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------- entry points


def stop_chain_cli(args: argparse.Namespace) -> int:
    """`relay stop --chain [--undo]`: write (or remove) RUN/chain/STOP, from anywhere that reaches the store."""
    from runner.state import find_run  # noqa: PLC0415
    from runner.storage.url import open_storage  # noqa: PLC0415

    storage = open_storage(args.storage)
    named = args.run or (identify_run(args.profile) if getattr(args, "profile", None) else None)
    run = find_run(storage, named)
    if getattr(args, "undo", False):
        clear_stop(storage, run)
        print(f"chain of {run}: may continue (the stop flag is removed)")
    else:
        request_stop(storage, run, SystemClock(), by=os.uname().nodename)
        print(f"chain of {run}: stops at the end of the session now running; it pushes no next session")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runner.chain", description="the Kaggle chain, from a notebook cell")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("begin", help="at the session's start: note the chain link this session continues")
    a = sub.add_parser("after", help="after the trainer exits: push the next session or say why not")
    for q in (b, a):
        q.add_argument("--profile", required=True)
        q.add_argument("--storage", required=True)
        q.add_argument("--run", help="run name (default: the profile's run key, else its name)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
        q.add_argument("--state-file", help="this VM's chain note (default: TMPDIR/relay-chain-RUN.json)")
        q.add_argument("--kaggle-json", help="a 0600 file holding kaggle.json (default: KAGGLE_API_TOKEN, or "
                       "KAGGLE_USERNAME/KAGGLE_KEY)")  # fmt: skip
    a.add_argument("--exit-code", type=int, required=True, help="the trainer's exit code")
    a.add_argument("--settle-s", type=float, default=SETTLE_S, help="the successor claim's window")
    a.add_argument("--min-session-h", type=float, default=MIN_SESSION_H)
    s = sub.add_parser("status", help="the chain's state as JSON")
    s.add_argument("--storage", required=True)
    s.add_argument("--run")
    return p


def _credentials(path: str | None, environ: Mapping[str, str]) -> KaggleCredentials:
    if not path:
        return KaggleCredentials.from_env(environ)
    file = Path(path)
    if file.stat().st_mode & 0o077:
        raise CredentialsError(f"{path}: readable by others", hint=f"chmod 600 {path}")
    return KaggleCredentials.from_kaggle_json(file.read_text(), source=path)


def _chain_profile(args: argparse.Namespace):
    """The profile's session settings, or None when the chain is off."""
    from runner.profile import load_profile  # noqa: PLC0415

    profile = load_profile(args.profile, args.overrides)
    if profile.session.chain != "kaggle":
        print('chain: off (session.chain is not "kaggle")')
        return None
    if not profile.session.chain_notebook:
        raise UsageError("session.chain_notebook is empty", hint='set it to your notebook, e.g. "USER/SLUG"')
    return profile


def _state_file(args: argparse.Namespace, run: str) -> Path:
    return Path(args.state_file) if args.state_file else Path(tempfile.gettempdir()) / f"relay-chain-{run}.json"


def _begin(args: argparse.Namespace) -> int:
    from runner.storage.url import open_storage  # noqa: PLC0415

    profile = _chain_profile(args)
    if profile is not None:
        run = run_identity(profile, args.run)
        storage, clock = open_storage(args.storage), SystemClock()
        link = begin_session(storage, run, _state_file(args, run), clock)
        print(f"chain: this session continues link {link}")
        _session_quota(args, storage, run, clock)
    return 0


QUOTA_LINE = "chain-quota "
"""`begin` prints this, then JSON {end_wall, source}, for the notebook cell: the session must end before then."""


def _session_quota(args: argparse.Namespace, storage, run: str, clock: Clock) -> None:
    """On Kaggle, the account's GPU quota left at the session's start (with the user's own credentials), for
    the cell to size the session by: min(Kaggle's 12 h, the quota). Without it (no credentials, an older
    kagglesdk, no answer) a clear line says the session is sized by the 12 h alone. Recorded in RUN/chain/quota/."""
    from runner.env import detect_platform  # noqa: PLC0415

    if detect_platform(os.environ, os.path.exists) != "kaggle":
        return
    try:
        api = SdkKaggleApi(_credentials(args.kaggle_json, os.environ))
        left, note = api.gpu_quota_left_h(), api.quota_note
    except (CredentialsError, UsageError) as exc:  # messages name no secret
        left, note = None, str(exc)
    now = clock.wall()
    source = (f"the Kaggle GPU quota ({left:.1f} h left at the session's start, GetAcceleratorQuotaStatistics)"
              if left is not None else "Kaggle's 12 h session limit")  # fmt: skip
    try:
        put_json(storage, f"{run}/{CHAIN_DIR}/quota/{int(now * 1000):015d}.json", {
            "at_wall": now, "at": iso(now), "left_h": left, "used": source,
            "note": note,
        })  # fmt: skip
    except RelayError as exc:
        log.warning("chain: quota reading not recorded: %s", exc)
    if left is None:
        print(f"chain: this session is sized by Kaggle's 12 h limit alone: {note}")
        return
    print(f"chain: {left:.1f} h of this week's Kaggle GPU quota left (allowed − used − reserved)")
    print(QUOTA_LINE + json.dumps({"end_wall": now + left * 3600, "source": source}))


def _after(args: argparse.Namespace) -> int:
    from runner.env import detect_env  # noqa: PLC0415
    from runner.storage.url import open_storage  # noqa: PLC0415

    profile = _chain_profile(args)
    if profile is None:
        return 0
    run, storage, clock = run_identity(profile, args.run), open_storage(args.storage), SystemClock()
    state = _state_file(args, run)
    if not state.is_file():
        log.warning("chain: `begin` did not run at this session's start; a successor pushed meanwhile goes unseen")
    link = begin_session(storage, run, state, clock)
    env = detect_env(workdir=tempfile.gettempdir())
    api = SdkKaggleApi(_credentials(args.kaggle_json, os.environ))
    decision = after_session(
        args.exit_code, storage=storage, run=run, notebook=profile.session.chain_notebook, api=api, link=link,
        clock=clock, gpu_names=[g.name for g in env.gpus], settle_s=args.settle_s, min_session_h=args.min_session_h,
    )  # fmt: skip
    print(f"chain: {decision.reason}: {decision.message}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":
            from runner.state import find_run  # noqa: PLC0415
            from runner.storage.url import open_storage  # noqa: PLC0415

            storage = open_storage(args.storage)
            print(json.dumps(status(storage, find_run(storage, args.run)).to_dict(), indent=1))
            return 0
        return _begin(args) if args.command == "begin" else _after(args)
    except RelayError as exc:
        print(f"relay chain: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
