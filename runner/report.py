"""`relay profiles`, `relay status` and `relay doctor`: read-only reports.

Owns: what these commands print. Loads no model and needs no GPU: status reads
run.json, sessions.jsonl, lease.json, which checkpoint folders hold a
COMMIT.json (names only, nothing is verified) and the newest one's small
state.json (for sessions killed before they could log themselves); doctor checks the
machine line by line with a verdict each. Imports no torch at module level
(doctor checks for it with importlib). Stored values are printed as plain text,
never as rich markup.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from runner.checkpoint.manager import CHECKPOINT_DIR, STATE_FILE, committed_steps, step_dir_name
from runner.checkpoint.manifest import COMMIT
from runner.clock import iso
from runner.env import detect_env
from runner.errors import UsageError
from runner.lease import read_lease
from runner.profile import list_profiles, load_profile
from runner.state import read_run_info, read_sessions
from runner.storage.blobs import read_bytes
from runner.storage.url import open_storage

log = logging.getLogger(__name__)
CLEAN_ENDS = ("completed", "budget", "signal")  # how a session that exits on its own ends
SESSION_LENGTHS_H = (3.0, 12.0)  # a typical Colab free session (often less than its 12 h cap), a Kaggle one
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
    """A run's progress as its storage records it."""

    run: str
    step: int  # the newest committed checkpoint's step (0 before the first)
    target: int  # optimizer steps the run aims for
    last_checkpoint: int | None  # None before the first checkpoint
    sessions: list[dict]  # sessions.jsonl records, oldest first
    steps_per_hour: float | None  # measured over all sessions' training time; None before any
    complete: bool = False  # final/ is committed
    holder: str | None = None  # who holds the lease (a session training now, or one that died)
    heartbeat: str | None = None  # ISO time of the holder's last heartbeat

    @property
    def hours_left(self) -> float | None:
        if self.complete or self.step >= self.target:
            return 0.0
        if not self.steps_per_hour:
            return None
        return (self.target - self.step) / self.steps_per_hour

    def sessions_left(self, session_h: float) -> int | None:
        hours = self.hours_left
        return None if hours is None else math.ceil(hours / session_h) if hours > 0 else 0

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self), "hours_left": self.hours_left,
            "sessions_left": {f"{h:g}h": self.sessions_left(h) for h in SESSION_LENGTHS_H},
        }  # fmt: skip


def find_run(storage, run: str | None) -> str:
    if run:
        return run
    runs = sorted({key.split("/")[0] for key in storage.list("") if key.endswith("/run.json")})
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UsageError(
            f"no run found in {storage.url}", hint="start one with: relay train --profile NAME --storage URL"
        )
    raise UsageError(f"several runs in {storage.url}: {', '.join(runs)}", hint="choose one with --run NAME")


def read_status(storage, run: str | None) -> RunStatus:
    """What `relay status` shows, from run.json, sessions.jsonl, the COMMIT.json names and lease.json."""
    run = find_run(storage, run)
    info = read_run_info(storage, run, missing_ok=False)
    committed = committed_steps(storage, run)
    last = committed[-1] if committed else None
    sessions = _with_killed_sessions(read_sessions(storage, run), _checkpoint_sessions(storage, run, last))
    trained_steps = sum(s.get("steps", 0) for s in sessions)
    train_hours = sum(s.get("train_s", 0.0) for s in sessions) / 3600
    rate = trained_steps / train_hours if train_hours > 0 and trained_steps > 0 else None
    lease = read_lease(storage, run)
    return RunStatus(
        run, last or 0, info.target, last, sessions, rate, complete=storage.exists(f"{run}/final/{COMMIT}"),
        holder=lease.holder if lease else None, heartbeat=iso(lease.heartbeat_wall) if lease else None,
    )  # fmt: skip


def _checkpoint_sessions(storage, run: str, step: int | None) -> list[dict]:
    """The session records inside the newest checkpoint's state.json ([] when there is none or it is unreadable)."""
    if step is None:
        return []
    raw = read_bytes(storage, f"{run}/{CHECKPOINT_DIR}/{step_dir_name(step)}/{STATE_FILE}")
    try:
        sessions = json.loads(raw or b"{}").get("sessions", [])
    except (ValueError, AttributeError):
        log.warning("%s: state.json of step %d is unreadable; sessions come from sessions.jsonl only", run, step)
        return []
    return [s for s in sessions if isinstance(s, dict)]


def _with_killed_sessions(logged: list[dict], in_checkpoint: list[dict]) -> list[dict]:
    """sessions.jsonl gets a line when a session exits; one killed outright (a Colab disconnect) never writes it.
    Its record survives in the checkpoints it committed: add it, marked "killed", in start order."""
    known = {s.get("id") for s in logged}
    killed = [
        {**s, "reason": s.get("reason") if s.get("reason") in CLEAN_ENDS else "killed"}
        for s in in_checkpoint
        if s.get("id") not in known
    ]
    if not killed:
        return logged
    return sorted([*logged, *killed], key=lambda s: s.get("start_wall") or 0)


def print_status(storage_url: str, run: str | None, *, as_json: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    status = read_status(open_storage(storage_url), run)
    if as_json:
        console.print_json(json.dumps(status.to_dict()))
        return 0
    # Stored values (run names, hosts like "colab:abc:pid7") go out as plain Text: as markup, ":abc:" would
    # become an emoji and "[x]" a style.
    pct = 100 * status.step / status.target if status.target else 0
    done = " — complete, final/ written" if status.complete else ""
    console.print(Text.assemble((status.run, "bold"), f": step {status.step} / {status.target} ({pct:.0f} %){done}"))
    last = status.last_checkpoint
    console.print(Text(f"last committed checkpoint: {'step ' + str(last) if last is not None else 'none yet'}"))
    if status.holder and not status.complete:
        console.print(Text(f"lease held by {status.holder} (last heartbeat {status.heartbeat})"))
    console.print(Text(_still_needed(status)))
    _print_sessions(console, status.sessions)
    return 0


def _still_needed(status: RunStatus) -> str:
    if status.complete:
        return "nothing left to train: the LoRA is in final/"
    if status.hours_left is None:
        return "still needed: unknown until a session has trained some steps"
    parts = ", ".join(f"{status.sessions_left(h)} of {h:g} h" for h in SESSION_LENGTHS_H)
    return (
        f"still needed: {status.hours_left:.1f} h of training at {status.steps_per_hour:.0f} steps/h "
        f"≈ sessions: {parts}"
    )


def _print_sessions(console: Console, sessions: list[dict]) -> None:
    if not sessions:
        console.print("no sessions recorded yet")
        return
    table = Table("#", "platform", "GPU", "started", "steps", "hours", "ended", box=None)
    for i, s in enumerate(sessions, 1):
        cells = (
            i, s.get("platform", "?"), s.get("gpu", "?"), s.get("started", "?"),
            f"{s.get('step_from', '?')}→{s.get('step_to', '?')}", f"{(s.get('wall_s') or 0) / 3600:.2f}",
            s.get("reason", "?"),
        )  # fmt: skip
        table.add_row(*(Text(str(cell)) for cell in cells))
    console.print(table)


def run_doctor(storage_url: str, profile_ref: str | None, console: Console | None = None) -> int:
    """Check what a run needs, one line and one verdict each. Exit 1 if anything fails."""
    console = console or Console()
    env = detect_env()
    checks = [
        ("platform", True, f"{env.platform} ({env.tier}), host {env.host}"),
        ("python", sys.version_info >= (3, 10), sys.version.split()[0]),
        (
            "GPU",
            bool(env.gpus),
            env.gpu_summary + "".join(f"; {g.name}: {g.free_gib:.1f}/{g.total_gib:.1f} GiB free" for g in env.gpus),
        ),
        ("RAM", env.ram_gib >= 10 or env.ram_gib == 0, f"{env.ram_gib:.1f} GiB"),
        (
            "disk",
            env.disk_free_gib >= DISK_NEEDED_GIB,
            f"{env.disk_free_gib:.1f} GiB free in {env.workdir} (need ~{DISK_NEEDED_GIB:.0f})",
        ),
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
        mark = (
            "[green]ok  [/]"
            if good
            else ("[yellow]warn[/]" if name in ("GPU", "bitsandbytes", "RAM") else "[red]FAIL[/]")
        )
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
        return False, 'not installed: optimizer = "adamw8bit" unavailable (the default "adamw" needs none)'
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
