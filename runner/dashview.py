"""The dashboard's views: a snapshot drawn as a rich panel or as one plain log line.

Owns: the pure views `render(snapshot, now)` (a rich renderable: terminal, Jupyter) and
`plain_line(snapshot, now)` (background runs, CI, log files), and the formatting they share (sparkline,
ETA in sessions, sizes, the earlier sessions' rows).

Must not: read anything but the snapshot and `now`; print or hold state (runner.dashboard does);
import torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runner import events as ev
from runner import humanize
from runner.profile import VARIANT_SEPARATOR
from runner.snapshot import Snapshot

HISTORY_SHOWN = 5  # earlier sessions shown
SPARK = "▁▂▃▄▅▆▇█"
# Earlier sessions recorded as "running" in a checkpoint ended without saying how (killed, disconnected).
UNRECORDED_END = "killed"

# ---- formatting helpers (pure) ----


def sparkline(values: tuple[float, ...] | list[float]) -> str:
    """One block character per value, scaled between the min and max of `values`."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span <= 0:
        return SPARK[len(SPARK) // 2] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


format_duration = humanize.duration  # 12 s · 4 min · 2 h 05 min


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def eta_seconds(s: Snapshot) -> float | None:
    """Seconds of training left at the current pace, or None before the first step."""
    if s.step_s is None or s.target <= 0:
        return None
    return max(0, s.target - s.step) * s.step_s


def time_left(s: Snapshot, now: float) -> float | None:
    return None if s.time_left_s is None else max(0.0, s.time_left_s - (now - s.budget_at))


def eta_text(s: Snapshot, now: float) -> str:
    """'ETA 12 min · this session' or 'ETA 30 h · about 3 sessions' (counting this one)."""
    eta = eta_seconds(s)
    text = humanize.eta(eta)
    left = time_left(s, now)
    if eta is None or left is None or not s.session_length_s:
        return text
    if eta <= left:
        return f"{text} · this session"
    sessions = 1 + humanize.sessions_for((eta - left) / 3600, s.session_length_s / 3600)
    return f"{text} · about {sessions} sessions"


def _rate_text(s: Snapshot) -> str:
    if not s.step_s:
        return "— s/step"
    return f"{1 / s.step_s:.2f} steps/s · {s.step_s:.2f} s/step"


def _loss_text(s: Snapshot) -> str:
    if s.loss is None:
        return "loss —"
    return f"loss {s.loss:.4f} · ema {s.loss_ema:.4f}"


def _budget_text(s: Snapshot, now: float) -> str:
    left = time_left(s, now)
    parts = ["session left " + ("—" if left is None else format_duration(left))]
    if s.next_checkpoint_in_s is not None:
        due = max(0.0, s.next_checkpoint_in_s - (now - s.budget_at))
        parts.append(f"next checkpoint in {format_duration(due)}")
    return " · ".join(parts)


def _checkpoint_text(s: Snapshot, now: float) -> str:
    if s.checkpoint_step is None:
        text = "none yet"
    else:
        ago = format_duration(now - s.checkpoint_at) if s.checkpoint_at is not None else "?"
        size = format_bytes(s.checkpoint_bytes)
        text = f"step {s.checkpoint_step} · {size} in {s.checkpoint_upload_s:.0f} s · {ago} ago"
    return text


def _upload_text(u: ev.UploadProgress) -> str:
    pct = 100 * u.done_bytes / u.total_bytes if u.total_bytes else 0
    done, total = format_bytes(u.done_bytes), format_bytes(u.total_bytes)
    return f"step {u.step}: {done} / {total} ({pct:.0f}%) at {format_bytes(u.rate_bps)}/s"


def _vram_text(s: Snapshot) -> str:
    if s.vram_used_gib is None:
        return "—"
    peak = f" · peak {s.vram_peak_gib:.1f} GiB" if s.vram_peak_gib is not None else ""
    return f"{s.vram_used_gib:.1f} GiB{peak}"


def _session_row(entry: Mapping) -> str:
    """One sessions.jsonl entry; keys are read leniently (platform, gpu, step_from/step_to or steps, reason)."""
    steps = entry.get("steps")
    for first, last in (("step_from", "step_to"), ("start_step", "end_step")):
        if first in entry and last in entry:
            steps = f"{entry[first]}→{entry[last]}"
            break
    how = entry.get("reason", entry.get("ended", "?"))
    how = UNRECORDED_END if how == "running" else how  # an earlier session cannot be running now
    return f"{entry.get('platform', '?')} {entry.get('gpu', '?')} · steps {steps if steps is not None else '?'} · {how}"


# ---- views (pure) ----


def render(snapshot: Snapshot, now: float) -> RenderableType:
    """The dashboard as a rich renderable. Pure: the same snapshot and `now` give the same output."""
    s = snapshot
    pct = 100 * s.step / s.target if s.target else 0.0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    progress = f"step {s.step} / {s.target} ({pct:.1f}%) · {eta_text(s, now)}" if s.target else "starting…"
    grid.add_row("progress", progress)
    grid.add_row("", ProgressBar(total=max(1, s.target), completed=s.step, width=60))
    grid.add_row("loss", f"{_loss_text(s)} {sparkline(s.losses)}")
    grid.add_row("speed", _rate_text(s) + (f" · lr {s.lr:.2e}" if s.lr is not None else ""))
    grid.add_row("budget", _budget_text(s, now))
    grid.add_row("gpu mem", _vram_text(s))
    grid.add_row("checkpoint", _checkpoint_text(s, now))
    if s.upload is not None:
        grid.add_row("upload", _upload_text(s.upload))
    if s.val_loss is not None:
        grid.add_row("validation", f"val loss {s.val_loss:.4f} at step {s.val_step}")
    rows = (("plan", s.plan), ("cache", s.cache), ("sample", s.sample_path), ("stopping", s.stopping),
            ("ended", s.ended))  # fmt: skip
    for label, value in rows:
        if value:
            grid.add_row(label, value)
    parts: list[RenderableType] = [grid]
    if s.history or s.platform:
        parts.append(_history_table(s))
    if s.warnings:
        parts.append(_warnings_text(s))
    title = f"relay · {s.run or 'run'} · {s.platform or '?'} {s.gpu}".rstrip()
    return Panel(Group(*parts), title=title, title_align="left")


def _history_table(s: Snapshot) -> Text:
    lines = [f"#{i} {_session_row(h)}" for i, h in enumerate(s.history, 1)][-HISTORY_SHOWN:]
    now_row = f"{s.platform} {s.gpu} · steps {s.session_start_step}→{s.step} · {s.ended or 'running'}"
    lines.append(f"#{len(s.history) + 1} {now_row}")
    return Text("sessions\n" + "\n".join("  " + line for line in lines))


def _warnings_text(s: Snapshot) -> Text:
    lines = [f"  {w.kind} ×{w.count}: {w.message}" for w in s.warnings]
    return Text("warnings\n" + "\n".join(lines), style="yellow")


def plain_line(snapshot: Snapshot, now: float) -> str:
    """One line for logs: step, loss, pace, ETA, memory, checkpoint, budget. Pure."""
    s = snapshot
    if not s.target:  # before SessionStarted: only the plan or the cache build is known
        return "relay | starting" + "".join(f" | {v}" for v in (s.plan, s.cache and f"cache {s.cache}") if v)
    pct = 100 * s.step / s.target
    parts = [f"step {s.step}/{s.target} ({pct:.1f}%)", _loss_text(s), _rate_text(s), eta_text(s, now)]
    if s.vram_used_gib is not None:
        parts.append(f"vram {_vram_text(s)}")
    if s.checkpoint_step is not None:
        parts.append(f"ckpt step {s.checkpoint_step}")
    if s.upload is not None:
        parts.append(f"uploading {format_bytes(s.upload.done_bytes)}/{format_bytes(s.upload.total_bytes)}")
    if s.time_left_s is not None:
        parts.append(_budget_text(s, now))
    if s.skipped_steps:
        parts.append(f"skipped {s.skipped_steps}")
    if s.ended:
        parts.append(f"ended: {s.ended}")
    variant = (s.run or "").partition(VARIANT_SEPARATOR)[2]  # an experiment's run EXP--VARIANT: name the variant
    return "relay | " + (f"variant {variant} | " if variant else "") + " | ".join(parts)
