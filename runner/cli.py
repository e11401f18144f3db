"""The `relay` command: parses flags into calls. No logic lives here.

Commands: train, status, plan, sample, export, compare, publish, bench, doctor, profiles, attach, stop [--chain]. Flags
become profile overrides (`--set`, `--hours`) or session options; everything
else happens in commands.py (train, plan, sample, export), report.py (status, doctor) and the
modules they call. This is the one place that maps errors to exit codes and
messages; users never see a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from runner.errors import EXIT_USAGE, RelayError, exit_code_for
from runner.flags import DEFAULT_STORAGE, build_parser
from runner.secretfile import take_over

log = logging.getLogger("runner")


def set_without_equals(argv: Sequence[str]) -> str | None:
    """The message for `--set KEY VALUE` (two arguments), which argparse would only call unrecognized."""
    for i, arg in enumerate(argv[:-1]):
        item = argv[i + 1]
        if arg == "--set" and "=" not in item:
            value = argv[i + 2] if i + 2 < len(argv) and not argv[i + 2].startswith("-") else "VALUE"
            return f"--set {item}: write the key and its value as one argument, joined by '=': --set {item}={value}"
    return None


def main(argv: Sequence[str] | None = None, *, contexts: Callable[..., Any] | None = None) -> int:
    """`contexts`: how `relay train` builds a session's context (default: context.build_context; tests pass
    their own, which wraps the storage or listens on the event bus)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    take_over(os.environ)  # secrets handed over by a notebook cell or supervisor (runner.secretfile)
    bad_set = set_without_equals(argv)
    if bad_set:
        print(f"relay: error: {bad_set}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # the libraries' own advice (torchvision fallbacks, dtype casts) is noise to a user
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
    # bitsandbytes' CPU backend asks for `pip install kernels` whenever peft or diffusers import it; Relay never
    # runs bitsandbytes on a CPU (adamw8bit needs CUDA), so its CPU backend's advice is noise on every run.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    # google.auth warns "No project ID could be determined" for Colab's sign-in credentials; the Drive API
    # needs no project, and the warning reads as the cause of any Drive failure that follows.
    logging.getLogger("google.auth._default").setLevel(logging.ERROR)
    # With 8-bit frozen text encoders (lora.text_encoder_8bit) bitsandbytes warns "MatMul8bitLt: inputs will be
    # cast from torch.float32 to float16" on each 8-bit matmul: its int8 kernel takes fp16 inputs by design, so
    # nothing is lost that Relay could keep. torch's catch_warnings (autocast, checkpointing) resets Python's
    # show-once registry, so it came back ~500 times a step; it is filtered here, once, for the whole process.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from", category=UserWarning)
    try:
        return dispatch(args, contexts=contexts)
    except RelayError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt as exc:
        print("relay: interrupted", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # the boundary: an unexpected failure becomes a message, with details in the log
        log.info("unexpected failure", exc_info=True)  # the traceback, shown with -v
        print(f"relay: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  → rerun with -v for details; committed checkpoints are untouched", file=sys.stderr)
        return exit_code_for(exc)


def dispatch(args: argparse.Namespace, *, contexts: Callable[..., Any] | None = None) -> int:
    if args.command in ("train", "plan", "doctor"):  # before anything loads: a GPU torch cannot run is exit 2
        from runner.train.gpu_arch import ensure_gpus_supported

        ensure_gpus_supported()
    if args.command == "profiles":
        from runner.report import print_profiles

        return print_profiles()
    if args.command == "status":
        from runner.chainrecords import status_if_any
        from runner.report import print_status

        return print_status(args.storage, args.run, as_json=args.json, chain_of=status_if_any)
    if args.command == "doctor":
        from runner.doctor import run_doctor

        return run_doctor(args.storage, args.profile)
    if args.command == "publish":
        from runner.publish import publish_command

        return publish_command(args)
    if args.command == "stop" and args.chain:
        from runner.chain import stop_chain_cli

        args.storage = args.storage or os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE)
        return stop_chain_cli(args)
    if args.command == "bench":
        from runner.bench import run_bench

        return run_bench(args)
    if args.command in ("attach", "stop") or getattr(args, "detach", False):
        from runner import daemon

        return daemon.command(args)
    from runner import commands

    if args.command == "train" and contexts is not None:
        return commands.train(args, contexts=contexts)
    return {
        "train": commands.train,
        "plan": commands.plan,
        "compare": commands.compare,
        "sample": commands.sample,
        "export": commands.export,
    }[args.command](args)
