"""`relay doctor`: what a run needs on this machine, checked line by line with a verdict each.

Owns: the checks (platform, python, GPU, RAM, disk, session limit, packages, bitsandbytes, a write to
the storage, the profile) and the verdict; exit 1 when a line fails. Loads no model and imports no
torch (packages are checked with importlib). Warnings that only matter for SDXL do not fail a CPU
machine that can still run the tiny profile.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.text import Text

from runner import humanize
from runner.env import detect_env
from runner.profile import load_profile
from runner.storage.url import open_storage

DISK_NEEDED_GIB = 20.0  # full SDXL weights (~7 GB fp16 download) + cache + staging, with room to spare
CPU_MODELS = ("tiny",)  # model.base values small enough to train on a CPU


def run_doctor(storage_url: str, profile_ref: str | None, console: Console | None = None, env=None) -> int:
    """Check what a run needs, one line and one verdict each. Exit 1 if anything fails.

    env: the detected environment (None: detect it here, at the CLI edge)."""
    console = console or Console()
    env = env or detect_env()
    profile, profile_check = _profile_check(profile_ref)
    needs_gpu = profile is not None and profile.model.base not in CPU_MODELS
    gpu_detail = env.gpu_summary + "".join(f"; {g.name}: {g.free_gib:.1f}/{g.total_gib:.1f} GiB free" for g in env.gpus)
    if not env.gpus:
        gpu_detail = (f"no CUDA GPU: {profile.name} (SDXL) cannot train here; CPU only suits the tiny profile"
                      if needs_gpu else "no CUDA GPU: CPU only suits the tiny profile")  # fmt: skip
    checks = [
        ("platform", True, f"{env.platform} ({env.tier}), host {env.host}"),
        ("python", sys.version_info >= (3, 10), sys.version.split()[0]),
        ("GPU", bool(env.gpus), gpu_detail),
        ("RAM", env.ram_gib >= 10 or env.ram_gib == 0, f"{env.ram_gib:.1f} GiB"),
        (
            "disk",
            env.disk_free_gib >= DISK_NEEDED_GIB,
            f"{env.disk_free_gib:.1f} GiB free in {env.workdir} (need ~{DISK_NEEDED_GIB:.0f})",
        ),
        ("session", True, humanize.session_limit(env.session_limit_h)),
    ]
    for package in ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors", "pydrive2"):
        checks.append((package, *_package_version(package)))
    checks.append(("bitsandbytes", *_bitsandbytes_check(bool(env.gpus))))
    checks.append(("storage", *_storage_check(storage_url)))
    if profile_check is not None:
        checks.append(profile_check)
    warn_only = ("bitsandbytes", "RAM") if needs_gpu else ("GPU", "bitsandbytes", "RAM")
    ok = True
    for name, good, detail in checks:
        ok &= good or name in warn_only  # CPU-only machines still run the tiny profile
        mark = "[green]ok  [/]" if good else ("[yellow]warn[/]" if name in warn_only else "[red]FAIL[/]")
        console.print(Text.from_markup(mark).append(f" {name:<13} {detail}"))
    if not ok:
        verdict = "[red]fix the FAIL lines first[/]"
    elif not env.gpus:
        verdict = "[yellow]ready for the tiny profile only (no GPU: SDXL cannot train here)[/]"
    else:
        verdict = "[green]ready[/]"
    console.print("verdict: " + verdict)
    return 0 if ok else 1


def _profile_check(profile_ref: str | None):
    """(the profile or None, its check line or None)."""
    if not profile_ref:
        return None, None
    try:
        profile = load_profile(profile_ref)
    except Exception as exc:  # doctor reports every failure as a line instead of stopping
        return None, ("profile", False, str(exc))
    return profile, ("profile", True, f"{profile.name}: {profile.description}")


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
