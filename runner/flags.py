"""The `relay` command line's flags: the argparse parser, and nothing else.

Owns: every command's flags and their defaults. Both the CLI (runner.cli) and the detached trainer's
supervisor (runner.daemon, which reads a `relay train` command line to name its run) parse with it, so
neither imports the other. Must not: act on the flags, import torch.
"""

from __future__ import annotations

import argparse
import os

from runner import __version__

DEFAULT_STORAGE = "./relay-runs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Train SDXL LoRA across free Colab/Kaggle sessions: checkpoint, stop cleanly, resume exactly.",
        epilog="Exit codes: 0 target reached · 75 session over, run the same command again · 1 error · 2 bad input · 3 refused (another session holds the run, or the credentials were refused).",
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
