"""The run's loss curve as a PNG: train and validation loss across all sessions, session boundaries marked.

Owns: reading the scalars every session wrote to TensorBoard event files (RUN/logs/SESSION_ID/, one folder
per session; runner.tblog writes them), merging them into one history (`LossHistory`), and drawing it
with PIL (pillow is a dependency; matplotlib is not). `update_loss_curve` brings the earlier sessions'
event files from storage, draws RUN/loss.png and stores it.

A resumed session trains again the steps after the last committed checkpoint; for a step logged by several
sessions, the latest session's value is kept. A session boundary is the first step a session logged.

Must not: decide when to draw (the session calls it at the end of a session and before final/ is
committed), or let a drawing failure cost training (callers treat it as best effort).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

TRAIN_TAG = "train/loss"
VAL_TAG = "val/loss"
SIZE_PX = (900, 420)  # width, height of the PNG
MARGIN_PX = (64, 24, 16, 40)  # left, top, right, bottom: room for the axis labels
EMA = 0.05  # smoothing of the train loss line (weight of the newest value); the raw losses are drawn faint
COLOURS = {"train": (150, 180, 220), "smooth": (31, 90, 180), "val": (214, 96, 30), "session": (120, 120, 120)}


@dataclass(frozen=True)
class LossHistory:
    """Loss over the whole run: (step, value) pairs in step order, and the steps where sessions began."""

    train: tuple[tuple[int, float], ...] = ()
    val: tuple[tuple[int, float], ...] = ()
    session_starts: tuple[int, ...] = field(default=())  # first step of each session after the first

    @property
    def is_empty(self) -> bool:
        return not self.train and not self.val


def read_history(logs_root: Path) -> LossHistory:
    """The history from every session folder under `logs_root` (RUN/logs), sessions ordered by wall time."""
    sessions = []
    for folder in sorted(p for p in Path(logs_root).iterdir() if p.is_dir()) if Path(logs_root).is_dir() else []:
        scalars = _read_scalars(folder)
        if scalars:
            sessions.append(scalars)
    sessions.sort(key=lambda s: s["wall"])
    return merge_sessions([(s.get(TRAIN_TAG, []), s.get(VAL_TAG, [])) for s in sessions])


def merge_sessions(sessions: list[tuple[list[tuple[int, float]], list[tuple[int, float]]]]) -> LossHistory:
    """One history from per-session (train, val) pairs, oldest session first. Pure."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    starts = []
    for i, (session_train, session_val) in enumerate(sessions):
        steps = [s for s, _ in session_train] or [s for s, _ in session_val]
        if i and steps:
            starts.append(min(steps))
        train.update(session_train)
        val.update(session_val)
    return LossHistory(tuple(sorted(train.items())), tuple(sorted(val.items())), tuple(sorted(set(starts))))


def _read_scalars(folder: Path) -> dict:
    """{tag: [(step, value)], "wall": first wall time} of the event files in `folder` ({} when none)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        log.info("tensorboard is not installed: no loss curve")
        return {}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every value
    try:
        acc.Reload()
    except Exception as exc:  # a torn event file (a killed session) must not stop the rest
        log.warning("event files in %s unreadable (%s); skipped in the loss curve", folder, exc)
        return {}
    tags = set(acc.Tags().get("scalars", []))
    out: dict = {}
    walls = []
    for tag in (TRAIN_TAG, VAL_TAG):
        if tag in tags:
            events = acc.Scalars(tag)
            out[tag] = [(e.step, float(e.value)) for e in events]
            walls += [e.wall_time for e in events]
    if walls:
        out["wall"] = min(walls)
    return out if walls else {}


# ---------------------------------------------------------------- drawing


def draw(history: LossHistory, out_path: Path, *, title: str = "loss") -> Path:
    """Write the curve as a PNG at `out_path`: faint raw train loss, its smoothed line, validation loss as
    dots joined by a line, a dashed line where each later session began. Needs a non-empty history."""
    if history.is_empty:
        raise ValueError("no loss values to draw")
    image = Image.new("RGB", SIZE_PX, "white")
    d = ImageDraw.Draw(image)
    steps = [s for s, _ in (*history.train, *history.val)]
    values = [v for _, v in (*history.train, *history.val) if v == v and abs(v) != float("inf")]
    axes = _Axes(min(steps), max(steps), min(values, default=0.0), max(values, default=1.0))
    axes.frame(d)
    for step in history.session_starts:
        axes.session_line(d, step)
    axes.line(d, history.train, COLOURS["train"], 1)
    axes.line(d, smooth(history.train), COLOURS["smooth"], 2)
    axes.line(d, history.val, COLOURS["val"], 2, dots=True)
    _legend(d, title, history)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return out_path


def smooth(points: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """An exponential moving average of the values, as the dashboard's loss EMA."""
    out, ema = [], None
    for step, value in points:
        ema = value if ema is None else ema + EMA * (value - ema)
        out.append((step, ema))
    return tuple(out)


@dataclass(frozen=True)
class _Axes:
    x0: float
    x1: float
    y0: float
    y1: float

    def xy(self, step: float, value: float) -> tuple[float, float]:
        left, top, right, bottom = MARGIN_PX
        width, height = SIZE_PX[0] - left - right, SIZE_PX[1] - top - bottom
        fx = (step - self.x0) / (self.x1 - self.x0) if self.x1 > self.x0 else 0.5
        fy = (value - self.y0) / (self.y1 - self.y0) if self.y1 > self.y0 else 0.5
        return left + fx * width, top + (1 - min(1.0, max(0.0, fy))) * height

    def frame(self, d: ImageDraw.ImageDraw) -> None:
        left, top, right, bottom = MARGIN_PX
        x_end, y_end = SIZE_PX[0] - right, SIZE_PX[1] - bottom
        d.rectangle((left, top, x_end, y_end), outline=(0, 0, 0))
        for i in range(5):  # five ticks on each axis
            step = self.x0 + (self.x1 - self.x0) * i / 4
            x, _ = self.xy(step, self.y0)
            d.line((x, y_end, x, y_end + 4), fill=(0, 0, 0))
            d.text((x, y_end + 6), f"{step:.0f}", fill=(0, 0, 0), anchor="ma")
            value = self.y0 + (self.y1 - self.y0) * i / 4
            _, y = self.xy(self.x0, value)
            d.line((left - 4, y, left, y), fill=(0, 0, 0))
            d.text((left - 6, y), f"{value:.3g}", fill=(0, 0, 0), anchor="rm")
        d.text(((left + x_end) / 2, SIZE_PX[1] - 4), "step", fill=(0, 0, 0), anchor="md")

    def session_line(self, d: ImageDraw.ImageDraw, step: int) -> None:
        x, _ = self.xy(step, self.y0)
        top, bottom = MARGIN_PX[1], SIZE_PX[1] - MARGIN_PX[3]
        for y in range(int(top), int(bottom), 8):  # dashed
            d.line((x, y, x, min(y + 4, bottom)), fill=COLOURS["session"])

    def line(self, d: ImageDraw.ImageDraw, points, colour, width: int, *, dots: bool = False) -> None:
        xy = [self.xy(s, v) for s, v in points if v == v and abs(v) != float("inf")]  # NaN/inf: skipped steps
        if len(xy) > 1:
            d.line(xy, fill=colour, width=width)
        if dots or len(xy) == 1:
            for x, y in xy:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def _legend(d: ImageDraw.ImageDraw, title: str, history: LossHistory) -> None:
    x, y = MARGIN_PX[0] + 8, 4
    d.text((x, y), title, fill=(0, 0, 0))
    x += 12 + d.textlength(title)
    entries = [("train", COLOURS["smooth"]), ("train (raw)", COLOURS["train"])]
    if history.val:
        entries.append(("validation", COLOURS["val"]))
    if history.session_starts:
        entries.append(("new session", COLOURS["session"]))
    for label, colour in entries:
        d.line((x, y + 6, x + 16, y + 6), fill=colour, width=2)
        d.text((x + 20, y), label, fill=(0, 0, 0))
        x += 32 + d.textlength(label)


# ---------------------------------------------------------------- the run's loss.png


def update_loss_curve(storage, run: str, logs_root: Path, out_path: Path) -> Path | None:
    """Fetch the event files of earlier sessions (RUN/logs/... in storage) missing under `logs_root`, draw
    the curve at `out_path` and store it as RUN/loss.png. None when no loss was logged yet."""
    logs_root = Path(logs_root)
    for key in storage.list(f"{run}/logs"):
        local = logs_root / key.removeprefix(f"{run}/logs/")
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.get(key, local)
    history = read_history(logs_root)
    if history.is_empty:
        return None
    draw(history, out_path, title=f"{run} loss")
    storage.put(Path(out_path), f"{run}/loss.png")
    return Path(out_path)
