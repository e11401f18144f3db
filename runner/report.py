"""`relay profiles`, `relay status` and `relay doctor`: read-only reports.

Owns: what these commands print. Loads no model and needs no GPU: status reads
run.json, sessions.jsonl and the checkpoints' COMMIT.json from storage; doctor
checks the machine line by line with a verdict each. Imports no torch at module
level (doctor checks for it with importlib).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from runner.checkpoint.manifest import COMMIT
from runner.env import detect_env
from runner.errors import UsageError
from runner.profile import list_profiles, load_profile
from runner.state import read_run_info, read_sessions
from runner.storage.url import open_storage

CHECKPOINT_DIR = "checkpoints"
DISK_NEEDED_GIB = 20.0  # full SDXL weights (~7 GB fp16 download) + cache + staging, with room to spare


def print_profiles(console: Console | None = None) -> int:
    console = console or Console()
    table = Table("profile", "description", box=None, pad_edge=False)
    for name, desc in list_profiles():
        table.add_row(name, desc)
    console.print(table)
    console.print("use: relay train --profile NAME   (or a path to your own .toml)")
    return 0


@dataclass(frozen=True)
class RunStatus:
    run: str
    step: int
    target: int
    last_checkpoint: int | None
    sessions: list[dict]
    steps_per_hour: float | None

    @property
    def hours_left(self) -> float | None:
        if not self.steps_per_hour:
            return None
        return max(0, self.target - self.step) / self.steps_per_hour

    def sessions_left(self, session_h: float) -> int | None:
        hours = self.hours_left
        return None if hours is None else math.ceil(hours / session_h) if hours > 0 else 0


def find_run(storage, run: str | None) -> str:
    if run:
        return run
    runs = sorted({key.split("/")[0] for key in storage.list("") if key.endswith("/run.json")})
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UsageError(f"no run found in {storage.url}", hint="start one with: relay train --profile NAME --storage URL")
    raise UsageError(f"several runs in {storage.url}: {', '.join(runs)}", hint="choose one with --run NAME")


def read_status(storage, run: str | None) -> RunStatus:
    run = find_run(storage, run)
    info = read_run_info(storage, run)
    sessions = read_sessions(storage, run)
    committed = sorted(
        int(key.split("/")[-2].removeprefix("step-"))
        for key in storage.list(f"{run}/{CHECKPOINT_DIR}")
        if key.endswith(f"/{COMMIT}")
    )
    last = committed[-1] if committed else None
    trained_steps = sum(s.get("steps", 0) for s in sessions)
    train_hours = sum(s.get("train_s", 0.0) for s in sessions) / 3600
    rate = trained_steps / train_hours if train_hours > 0 and trained_steps > 0 else None
    return RunStatus(run, last or 0, info.target, last, sessions, rate)


def print_status(storage_url: str, run: str | None, *, as_json: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    status = read_status(open_storage(storage_url), run)
    if as_json:
        payload = {**status.__dict__, "hours_left": status.hours_left}
        console.print_json(json.dumps(payload))
        return 0
    pct = 100 * status.step / status.target if status.target else 0
    console.print(f"[bold]{status.run}[/]: step {status.step} / {status.target} ({pct:.0f} %)")
    console.print(f"last committed checkpoint: {status.last_checkpoint if status.last_checkpoint is not None else 'none yet'}")
    if status.hours_left is not None:
        console.print(
            f"still needed: {status.hours_left:.1f} h of training at {status.steps_per_hour:.0f} steps/h "
            f"≈ {status.sessions_left(3.0)} sessions of 3 h, {status.sessions_left(12.0)} of 12 h"
        )
    table = Table("#", "platform", "GPU", "started", "steps", "hours", "ended", box=None)
    for i, s in enumerate(status.sessions, 1):
        table.add_row(
            str(i), s.get("platform", "?"), s.get("gpu", "?"), s.get("started", "?"),
            f"{s.get('step_from', '?')}→{s.get('step_to', '?')}", f"{s.get('wall_s', 0) / 3600:.2f}", s.get("reason", "?"),
        )
    console.print(table if status.sessions else "no sessions recorded yet")
    return 0


def run_doctor(storage_url: str, profile_ref: str | None, console: Console | None = None) -> int:
    """Check what a run needs, one line and one verdict each. Exit 1 if anything fails."""
    console = console or Console()
    env = detect_env()
    checks = [
        ("platform", True, f"{env.platform} ({env.tier}), host {env.host}"),
        ("python", sys.version_info >= (3, 10), sys.version.split()[0]),
        ("GPU", bool(env.gpus), env.gpu_summary + "".join(f"; {g.name}: {g.free_gib:.1f}/{g.total_gib:.1f} GiB free" for g in env.gpus)),
        ("RAM", env.ram_gib >= 10 or env.ram_gib == 0, f"{env.ram_gib:.1f} GiB"),
        ("disk", env.disk_free_gib >= DISK_NEEDED_GIB, f"{env.disk_free_gib:.1f} GiB free in {env.workdir} (need ~{DISK_NEEDED_GIB:.0f})"),
        ("session", True, f"limit {env.session_limit_h or 'none'} h"),
    ]
    for package in ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors", "pydrive2"):
        checks.append((package, *_package_version(package)))
    checks.append(("bitsandbytes", *_bitsandbytes_check(bool(env.gpus))))
    checks.append(("storage", *_storage_check(storage_url)))
    if profile_ref:
        try:
            profile = load_profile(profile_ref)
            checks.append(("profile", True, f"{profile.name}: {profile.description}"))
        except Exception as exc:  # doctor reports every failure as a line instead of stopping
            checks.append(("profile", False, str(exc)))
    ok = True
    for name, good, detail in checks:
        ok &= good or name in ("GPU", "bitsandbytes")  # CPU-only machines still run the tiny profile
        mark = "[green]ok  [/]" if good else ("[yellow]warn[/]" if name in ("GPU", "bitsandbytes", "RAM") else "[red]FAIL[/]")
        console.print(f"{mark} {name:<13} {detail}")
    console.print("verdict: " + ("[green]ready[/]" if ok else "[red]fix the FAIL lines first[/]"))
    return 0 if ok else 1


def _package_version(name: str) -> tuple[bool, str]:
    try:
        return True, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False, "not installed (run bash bootstrap.sh)"


def _bitsandbytes_check(has_gpu: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "not installed: optimizer = \"adamw8bit\" unavailable (the default \"adamw\" needs none)"
    if not has_gpu:
        return False, "installed, but no CUDA GPU: adamw8bit unavailable here"
    return True, importlib.metadata.version("bitsandbytes")


def _storage_check(url: str) -> tuple[bool, str]:
    try:
        storage = open_storage(url)
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe"
            probe.write_text("relay doctor")
            storage.put(probe, ".relay-doctor/probe")
            ok = storage.exists(".relay-doctor/probe")
            storage.delete(".relay-doctor/probe")
        return ok, f"{storage.url}: writable"
    except Exception as exc:  # doctor reports every failure as a line instead of stopping
        return False, f"{url}: {exc}"
