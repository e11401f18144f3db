"""Durations and session counts as a person reads them.

Owns: the one way Relay writes a length of time ("45 s", "12 min", "2 h 05 min"),
a session limit ("no session limit") and the sessions a run still needs as a
sentence ("about 3 more sessions of 3 h, or 1 of 12 h"). Pure; imports nothing.
Every command that prints a time (dashboard, status, plan, doctor) uses these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def duration(seconds: float) -> str:
    """45 s · 12 min · 2 h 05 min · 3 h (seconds under a minute, minutes under an hour, rounded)."""
    seconds = max(0.0, float(seconds))
    if round(seconds) < 60:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if minutes else f"{hours} h"


def hours(h: float) -> str:
    """A length given in hours, written like `duration` (0.5 → "30 min")."""
    return duration(h * 3600)


def eta(seconds: float | None) -> str:
    """'ETA 12 min'; 'ETA —' before the pace is known."""
    return "ETA —" if seconds is None else f"ETA {duration(seconds)}"


def session_limit(limit_h: float | None) -> str:
    """'session limit 12 h', or 'no session limit' where the platform has none."""
    return f"session limit {hours(limit_h)}" if limit_h else "no session limit"


def sessions_needed(counts: Mapping[float, int]) -> str:
    """The sessions still needed for each session length (hours → count) as one sentence.

    {3: 3, 12: 1} → "about 3 more sessions of 3 h, or 1 of 12 h"; {3: 1, 12: 1} → "about 1 more session
    (of 3 h or 12 h)"; all zero → "no more sessions"."""
    items = [(h, n) for h, n in counts.items() if n is not None]
    if not items:
        return "sessions still needed: unknown"
    if all(n <= 0 for _, n in items):
        return "no more sessions"
    counts_seen = {n for _, n in items}
    if len(counts_seen) == 1:
        (n,) = counts_seen
        lengths = " or ".join(hours(h) for h, _ in items)
        return f"about {n} more {_plural(n, 'session')} (of {lengths})"
    (h0, n0), *rest = items
    tail = "".join(f", or {n} of {hours(h)}" for h, n in rest)
    return f"about {n0} more {_plural(n0, 'session')} of {hours(h0)}{tail}"


def sessions_for(hours_left: float, session_h: float) -> int:
    """Whole sessions of `session_h` hours that `hours_left` of training takes."""
    return math.ceil(hours_left / session_h) if hours_left > 0 else 0


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"
