"""Where Relay runs: platform, GPUs, memory, disk and the session's clock.

Owns: `detect_env()`, which reads the platform's signals (variables, paths), the
GPUs (through `nvidia-smi`, so it imports no torch), RAM, free disk and the
session's start; and `gpu_unsupported_reason()`, the pure check of the GPUs'
compute capability against the kernels the installed torch ships (the caller
passes `torch.cuda.get_arch_list()`; runner/train/gpu_arch.py reads it). Every
input (environment, file system, command runner, clock) is injectable so tests
fake Colab, Kaggle and local machines (tests/platforms/ holds their real variable
sets). Decides nothing else: budget.py turns the session's start and limit into
a deadline. Sources of every platform fact: docs/platforms.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runner.clock import Clock, SystemClock
from runner.errors import EXIT_USAGE, RelayError

# Kaggle's notebook image is built on Colab's (Kaggle/docker-python PR #1444), so COLAB_RELEASE_TAG and
# google.colab exist on Kaggle too (Kaggle/kagglehub PR #230). Kaggle is recognised by what only Kaggle
# sets, and checked first; these variables are inherited by `!python` child processes.
KAGGLE_VARS = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_URL", "KAGGLE_DATA_PROXY_TOKEN",
               "KAGGLE_USER_SECRETS_TOKEN")  # fmt: skip
KAGGLE_PATHS = ("/kaggle/working",)
COLAB_VARS = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION", "TBE_RUNTIME_ADDR")
COLAB_PATHS = ("/content/.config", "/var/colab")
NVIDIA_SMI_QUERY = "--query-gpu=name,memory.total,memory.free,compute_cap"
GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_gib: float
    free_gib: float
    compute_capability: str  # "7.5" for a T4

    @property
    def has_bf16(self) -> bool:
        """Ampere (8.0) and newer compute in bf16; a T4 (7.5) and a P100 (6.0) do not."""
        major = int(self.compute_capability.split(".")[0] or 0)
        return major >= 8


@dataclass(frozen=True)
class Env:
    platform: str  # colab, kaggle or local
    tier: str  # colab-free, colab-paid, kaggle, local
    host: str
    gpus: tuple[Gpu, ...] = ()
    ram_gib: float = 0.0
    disk_free_gib: float = 0.0
    workdir: str = ""
    session_start_wall: float = 0.0  # when the VM (Colab/Kaggle) or the process (local) started
    session_limit_h: float | None = None  # the platform's default limit, or less; None: no limit
    notes: tuple[str, ...] = field(default_factory=tuple)
    limit_source: str = ""  # where session_limit_h comes from (shown by relay plan, kept in sessions.jsonl)

    @property
    def gpu_summary(self) -> str:
        if not self.gpus:
            return "CPU"
        names = {g.name for g in self.gpus}
        return f"{len(self.gpus)}× {names.pop()}" if len(names) == 1 else ", ".join(g.name for g in self.gpus)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_platform(environ: Mapping[str, str], exists: Callable[[str], bool]) -> str:
    """kaggle, colab or local, from variables that survive in `!python` child processes, then paths.

    Kaggle first: its image carries Colab's variables and modules, Colab's carries nothing of Kaggle's.
    Variables before paths: a Colab notebook may create /kaggle/working for a script written for Kaggle."""
    if any(v in environ for v in KAGGLE_VARS):
        return "kaggle"
    if any(v in environ for v in COLAB_VARS):
        return "colab"
    if any(exists(p) for p in KAGGLE_PATHS):
        return "kaggle"
    if any(exists(p) for p in COLAB_PATHS):
        return "colab"
    return "local"


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """GPUs from `nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv,noheader,nounits`."""
    gpus = []
    for index, line in enumerate(row for row in text.splitlines() if row.strip()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            total, free = float(parts[1]) / 1024, float(parts[2]) / 1024
        except ValueError:
            continue
        gpus.append(Gpu(index, parts[0], round(total, 2), round(free, 2), parts[3]))
    return tuple(gpus)


def query_gpus(run: Callable[[list[str]], str] | None = None) -> tuple[Gpu, ...]:
    """Every visible NVIDIA GPU; none when nvidia-smi is missing or fails."""
    run = run or _run_command
    try:
        text = run(["nvidia-smi", NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"])
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = parse_nvidia_smi(text)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() != "":
        wanted = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        gpus = tuple(g for g in gpus if g.index in wanted)
    return gpus


def _run_command(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout


def read_uptime_s(read: Callable[[str], str]) -> float | None:
    """Seconds since the VM booted, from /proc/uptime."""
    try:
        return float(read("/proc/uptime").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_ram_gib(read: Callable[[str], str]) -> float:
    try:
        for line in read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        pass
    return 0.0


def tier_of(platform: str, gpus: tuple[Gpu, ...]) -> str:
    """Colab does not say which plan it runs on; a T4 (or none) is what the free plan hands out."""
    if platform == "colab":
        return "colab-free" if not gpus or all("T4" in g.name for g in gpus) else "colab-paid"
    return platform


def detect_env(
    *,
    environ: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
    read: Callable[[str], str] = lambda p: Path(p).read_text(),
    run: Callable[[list[str]], str] | None = None,
    clock: Clock | None = None,
    process_start_wall: float | None = None,
    workdir: str | None = None,
) -> Env:
    """Detect the platform, hardware and session clock. Every input can be faked."""
    from runner.budget import default_limit_h  # noqa: PLC0415 - the table lives with the budget

    environ = os.environ if environ is None else environ
    clock = clock or SystemClock()
    platform = detect_platform(environ, exists)
    gpus = query_gpus(run)
    tier = tier_of(platform, gpus)
    now = clock.wall()
    notes = []
    start = process_start_wall if process_start_wall is not None else now
    limit_h = default_limit_h(tier)
    limit_source = f"{platform}'s session limit" if limit_h else ""
    if platform != "local":
        uptime = read_uptime_s(read)
        if uptime is None:
            notes.append("VM uptime unknown (/proc/uptime unreadable): counting the session from process start")
        else:
            pooled = bool(limit_h) and uptime > limit_h * 3600  # only then is other evidence needed
            evidence = [start, *(ancestor_starts(read, now - uptime) if pooled else ())]
            start, note = session_start(now, uptime, limit_h, evidence)
            notes += [note] if note else []
    limit_h, limit_source, note = session_limit(limit_h, limit_source, start, environ)
    notes += [note] if note else []
    workdir = workdir or default_workdir(platform, environ)
    return Env(
        platform=platform,
        tier=tier,
        host=socket.gethostname(),
        gpus=gpus,
        ram_gib=read_ram_gib(read),
        disk_free_gib=_disk_free_gib(workdir),
        workdir=workdir,
        session_start_wall=start,
        session_limit_h=limit_h,
        notes=tuple(notes),
        limit_source=limit_source,
    )


# ---------------------------------------------------------------- the session's clock

SESSION_END_ENV = "RELAY_SESSION_END_WALL"
"""A hard end of this session learnt elsewhere, as Unix seconds: the Kaggle notebook cell sets it from the
account's GPU quota (GetAcceleratorQuotaStatistics, read by `runner.chain begin` at the session's start)."""
SESSION_END_SOURCE_ENV = "RELAY_SESSION_END_SOURCE"
UNTRUSTED_UPTIME_MARGIN_S = 3600.0
"""Taken off the earliest evidence of a session when the VM's uptime cannot be its age."""


def session_start(now: float, uptime_s: float, limit_h: float | None, evidence: Sequence[float]) -> tuple[float, str]:
    """(the session's start, a note) from the VM's uptime. Pure.

    A session cannot be older than its platform's limit, so a longer uptime means a VM that was reused or
    pooled before this session: its boot says nothing of this session. The start is then the earliest
    `evidence` (processes of this session: this one and its ancestors) that is itself younger than the
    limit, minus UNTRUSTED_UPTIME_MARGIN_S, and the note says so."""
    if not limit_h or uptime_s <= limit_h * 3600:
        return now - uptime_s, ""
    believable = [w for w in evidence if now - w < limit_h * 3600] or [now]
    start = min(believable) - UNTRUSTED_UPTIME_MARGIN_S
    return start, (
        f"the VM has been up {uptime_s / 3600:.1f} h, longer than a session may last ({limit_h:g} h): a reused or "
        f"pooled VM, so its boot is not this session's start. Counting from this session's earliest process, "
        f"{(now - min(believable)) / 3600:.1f} h ago, plus a {UNTRUSTED_UPTIME_MARGIN_S / 3600:g} h margin"
    )


def session_limit(
    limit_h: float | None, source: str, start: float, environ: Mapping[str, str]
) -> tuple[float | None, str, str]:
    """(limit in hours, its source, a note): the platform's limit, or less where RELAY_SESSION_END_WALL ends the
    session sooner (the Kaggle quota). Pure."""
    try:
        end = float(environ.get(SESSION_END_ENV) or "nan")
    except ValueError:
        end = float("nan")
    if end != end:  # NaN: not set
        return limit_h, source, ""
    by_end = max(0.0, (end - start) / 3600)
    if limit_h is not None and by_end >= limit_h:
        return limit_h, source, ""
    why = environ.get(SESSION_END_SOURCE_ENV) or SESSION_END_ENV
    return (
        by_end,
        why,
        f"session limit {by_end:.1f} h from {why}" + (f", less than the platform's {limit_h:g} h" if limit_h else ""),
    )


def ancestor_starts(read: Callable[[str], str], boot_wall: float, pid: int | None = None) -> list[float]:
    """Start times (Unix seconds) of this process and its ancestors, from /proc/PID/stat (field 22, clock ticks
    after boot); init (pid 1) is left out: it is as old as the VM. [] where /proc cannot be read."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    starts, pid = [], pid or os.getpid()
    for _ in range(64):
        if pid <= 1:
            break
        try:
            fields = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
            ppid, ticks = int(fields[1]), int(fields[19])
        except (OSError, LookupError, ValueError):
            break
        starts.append(boot_wall + ticks / hz)
        pid = ppid
    return starts


def default_workdir(platform: str, environ: Mapping[str, str]) -> str:
    """Fast local scratch space: /kaggle/temp is outside Kaggle's 20 GB saved output; /content on Colab."""
    if "RELAY_WORKDIR" in environ:
        return environ["RELAY_WORKDIR"]
    if platform == "kaggle":
        return "/kaggle/temp/relay"
    if platform == "colab":
        return "/content/relay-work"
    return str(Path(environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "relay")


def _disk_free_gib(path: str) -> float:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return round(shutil.disk_usage(probe).free / GIB, 1)
    except OSError:
        return 0.0


# ---------------------------------------------------------------- can the installed torch run these GPUs?

ACCELERATOR_ADVICE = {
    "kaggle": "choose 'GPU T4 x2' in Kaggle's accelerator menu (Settings → Accelerator); the P100 "
    "cannot run Kaggle's current torch (Kaggle/kaggle-cli #1151)",
    "colab": "choose a T4 GPU in Runtime → Change runtime type",
    "local": "use a GPU this torch supports, or install a torch build with kernels for it (pytorch.org)",
}


class UnsupportedGpu(RelayError):
    """The installed torch has no kernels for this GPU: every CUDA op would fail. The user must
    change the machine (or the torch build), so this is bad input: exit 2."""

    exit_code = EXIT_USAGE


def _parse_arch(entry: str) -> tuple[str, int, int, str] | None:
    """('sm' or 'compute', major, minor, suffix) of an arch-list entry: 'sm_75' → ('sm', 7, 5, ''),
    'sm_90a' → ('sm', 9, 0, 'a'), 'compute_120' → ('compute', 12, 0, ''); None when unreadable."""
    kind, _, code = entry.strip().partition("_")
    digits = code.rstrip("abcdefghijklmnopqrstuvwxyz")
    if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
        return None
    return kind, int(digits[:-1]), int(digits[-1]), code[len(digits) :]


def capability_runs(capability: str, arch_list: Sequence[str]) -> bool:
    """Whether a GPU of `capability` ("7.5") can run a torch built for `arch_list`.

    CUDA's rules: a cubin (sm_XY) runs on the same major version with a minor of Y or more;
    PTX (compute_XY) is compiled just in time for any capability of X.Y or more; an
    arch-specific build (sm_90a) runs on exactly that capability."""
    try:
        major, minor = (int(part) for part in capability.split(".")[:2])
    except ValueError:
        return True  # unknown capability: let torch decide
    for entry in arch_list:
        parsed = _parse_arch(entry)
        if parsed is None:
            continue
        kind, arch_major, arch_minor, suffix = parsed
        if suffix == "a":
            runs = (major, minor) == (arch_major, arch_minor)
        elif kind == "sm":
            runs = major == arch_major and minor >= arch_minor
        else:
            runs = (major, minor) >= (arch_major, arch_minor)
        if runs:
            return True
    return False


def gpu_unsupported_reason(
    gpus: Sequence[Gpu], arch_list: Sequence[str], platform: str, torch_version: str = ""
) -> str | None:
    """Why these GPUs cannot run the installed torch, with what to do; None when they can.

    `arch_list` is `torch.cuda.get_arch_list()`; empty (a CPU-only torch) means there is nothing to
    check here."""
    if not gpus or not arch_list:
        return None
    bad = [g for g in gpus if not capability_runs(g.compute_capability, arch_list)]
    if not bad:
        return None
    gpu = bad[0]
    sm = "sm_" + gpu.compute_capability.replace(".", "")
    return (
        f"the {gpu.name} (compute capability {gpu.compute_capability}, {sm}) cannot run this torch"
        f"{' ' + torch_version if torch_version else ''}: it ships kernels for {', '.join(arch_list)} only, "
        f"so every CUDA operation would fail with 'no kernel image is available'.\n  → "
        + ACCELERATOR_ADVICE.get(platform, ACCELERATOR_ADVICE["local"])
    )
