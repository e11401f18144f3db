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
from collections.abc import Sequence

from runner import __version__
from runner.errors import EXIT_USAGE, RelayError, exit_code_for
from runner.secretfile import take_over

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
    p.add_argument("--detach", action="store_true", help="train in the background (survives this terminal); "
                   "follow with relay attach, stop with relay stop")  # fmt: skip

    for name, what in (("attach", "follow a detached run's dashboard (Ctrl-C leaves it running)"),
                       ("stop", "ask a detached run to checkpoint and stop (it exits 75: resume later)")):  # fmt: skip
        p = sub.add_parser(name, help=what)
        p.add_argument("--run", help="run name (default: the run started last on this machine)")
        p.add_argument("--profile", help="the run this profile trains (its run key, else its name), as --run")
        p.add_argument("--storage", help="run storage URL (with --run: that run)")
        if name == "attach":
            p.add_argument("--plain", action="store_true", help="plain progress lines instead of the live dashboard")
        else:
            _stop_chain_args(p)

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
    p.add_argument("--text-encoder", action="store_true", help="LoRA on both text encoders too (sdxl-naruto-t4-te)")
    p.add_argument("--text-encoder-8bit", action="store_true", help="as --text-encoder, frozen encoders in 8-bit")
    p.add_argument("--targets", help="UNet LoRA targets, comma-separated (default: the profile's attention ones)")
    p.add_argument("--skip-resume", action="store_true", help="skip the resume timing (saves a UNet to disk)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("doctor", help="check this machine for a run: GPU, libraries, storage, disk")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE))
    p.add_argument("--profile", default=None)

    p = sub.add_parser("publish", help="push a finished run's final/ to a Hugging Face model repo (token: HF_TOKEN)")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--run", help="run name (default: the only run there)")
    p.add_argument("--repo", help="USER/NAME of the model repo (default: YOUR_NAME/RUN)")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")

    p = sub.add_parser("compare", help="an experiment's variants (or runs) side by side: loss plot, table, image grid")
    p.add_argument("runs", nargs="*", metavar="RUN", help="runs to compare (default: the experiment's variants)")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--experiment", help="experiment name (default: the only one in the storage)")
    p.add_argument("--out", help="local folder for the files (default: a temporary one); also stored in compare/")
    p.add_argument("--no-grid", action="store_true", help="skip the image grid (it needs a GPU or the tiny model)")

    sub.add_parser("profiles", help="list the shipped profiles")
    return parser


def _stop_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", action="store_true", help="stop the run's hands-off Kaggle chain (RUN/chain/STOP in "
                   "the store, from any machine): no next session is pushed")  # fmt: skip
    p.add_argument("--undo", action="store_true", help="with --chain: let the chain continue again")


def _run_args(p: argparse.ArgumentParser, *, profile_required: bool) -> None:
    p.add_argument("--profile", required=profile_required, help="profile name (relay profiles) or path to a .toml")
    p.add_argument("--storage", default=os.environ.get("RELAY_STORAGE", DEFAULT_STORAGE), help="run storage URL")
    p.add_argument("--run", help="run name (default: the profile's run key, else its name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--workdir", help="local scratch folder (default: platform-specific)")


def set_without_equals(argv: Sequence[str]) -> str | None:
    """The message for `--set KEY VALUE` (two arguments), which argparse would only call unrecognized."""
    for i, arg in enumerate(argv[:-1]):
        item = argv[i + 1]
        if arg == "--set" and "=" not in item:
            value = argv[i + 2] if i + 2 < len(argv) and not argv[i + 2].startswith("-") else "VALUE"
            return f"--set {item}: write the key and its value as one argument, joined by '=': --set {item}={value}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
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
        return dispatch(args)
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


def dispatch(args: argparse.Namespace) -> int:
    if args.command in ("train", "plan", "doctor"):  # before anything loads: a GPU torch cannot run is exit 2
        from runner.train.gpu_arch import ensure_gpus_supported

        ensure_gpus_supported()
    if args.command == "profiles":
        from runner.report import print_profiles

        return print_profiles()
    if args.command == "status":
        from runner.chain import status_if_any
        from runner.report import print_status

        return print_status(args.storage, args.run, as_json=args.json, chain_of=status_if_any)
    if args.command == "doctor":
        from runner.report import run_doctor

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

    return {
        "train": commands.train,
        "plan": commands.plan,
        "compare": commands.compare,
        "sample": commands.sample,
        "export": commands.export,
    }[args.command](args)
