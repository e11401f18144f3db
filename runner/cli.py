"""The `relay` command: parses flags into calls. No logic lives here.

Commands: train, status, plan, sample, export, bench, doctor, profiles, stop --chain. Flags
become profile overrides (`--set`, `--hours`) or session options; everything
else happens in session.py (train, plan), report.py (status, doctor) and the
modules they call. This is the one place that maps errors to exit codes and
messages; users never see a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from runner import __version__
from runner.errors import EXIT_ERROR, RelayError

DEFAULT_STORAGE = "./relay-runs"
log = logging.getLogger("runner")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Train SDXL LoRA across free Colab/Kaggle sessions: checkpoint, stop cleanly, resume exactly.",
        epilog="Exit codes: 0 target reached · 75 session over, run the same command again · 1 error · 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to the terminal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train (or resume) a run until the target or the end of the session")
    _run_args(p, profile_required=True)
    p.add_argument("--hours", type=float, help="session length in hours (default: the platform's limit)")
    p.add_argument("--take-over", action="store_true", help="take the run's lease from a session that is dead")
    p.add_argument("--force", action="store_true", help="resume even though weight-changing settings differ")
    p.add_argument("--release-gpu", action="store_true", help="on Colab, end the runtime after the final commit")
    p.add_argument("--plain", action="store_true", help="plain progress lines instead of the live dashboard")

    p = sub.add_parser("plan", help="dry run: platform, GPU, fit plan, steps this session, sessions still needed")
    _run_args(p, profile_required=True)
    p.add_argument("--hours", type=float, help="session length in hours (default: the platform's limit)")
    p.add_argument("--probe", action="store_true", help="probe the memory fit on this GPU (loads the UNet)")

    p = sub.add_parser("status", help="progress of a run from its storage (no model, no GPU)")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--run", help="run name (default: the only run there)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("sample", help="base vs LoRA image grid from the newest checkpoint")
    _run_args(p, profile_required=True)
    p.add_argument("--out", help="where to write the grid PNG (default: the run's samples/)")

    p = sub.add_parser("export", help="write final/ (diffusers + kohya LoRA, model card) from the newest checkpoint")
    _run_args(p, profile_required=True)

    p = sub.add_parser("bench", help="full-size SDXL training benchmark on random weights (GPU)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "off", "blocks", "graphs"],
        help="torch.compile of the UNet",
    )
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps (after warm-up)")
    p.add_argument("--vram-gib", type=float, help="cap the CUDA allocator to emulate a smaller GPU (15 for a T4)")
    p.add_argument("--model", default="sdxl-random", help="sdxl-random (full size) or tiny")
    p.add_argument("--skip-resume", action="store_true", help="skip the resume timing (saves a UNet to disk)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("doctor", help="check this machine for a run: GPU, libraries, storage, disk")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE))
    p.add_argument("--profile", default=None)

    sub.add_parser("profiles", help="list the shipped profiles")
    _stop_chain_args(sub.add_parser("stop", help="stop a run's Kaggle chain (--chain): no next session is pushed"))
    return parser


def _stop_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", action="store_true", required=True, help="stop the run's hands-off Kaggle chain")
    p.add_argument("--undo", action="store_true", help="with --chain: let the chain continue again")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--run", help="run name (default: the only run there)")


def _run_args(p: argparse.ArgumentParser, *, profile_required: bool) -> None:
    p.add_argument("--profile", required=profile_required, help="profile name (relay profiles) or path to a .toml")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--run", help="run name (default: the profile's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--workdir", help="local scratch folder (default: platform-specific)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # the libraries' own advice (torchvision fallbacks, dtype casts) is noise to a user
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
    try:
        return dispatch(args)
    except RelayError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("relay: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the boundary: an unexpected failure becomes a message, with details in the log
        log.info("unexpected failure", exc_info=True)  # the traceback, shown with -v
        print(f"relay: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  → rerun with -v for details; committed checkpoints are untouched", file=sys.stderr)
        return EXIT_ERROR


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "profiles":
        from runner.report import print_profiles

        return print_profiles()
    if args.command == "status":
        from runner.report import print_status

        return print_status(args.storage, args.run, as_json=args.json)
    if args.command == "doctor":
        from runner.report import run_doctor

        return run_doctor(args.storage, args.profile)
    if args.command == "stop" and args.chain:
        from runner.chain import stop_chain_cli

        return stop_chain_cli(args)
    if args.command == "bench":
        from runner.bench import run_bench

        return run_bench(args)
    from runner import session

    return {"train": session.train, "plan": session.plan, "sample": session.sample, "export": session.export}[
        args.command
    ](args)
