"""Time as an input.

Owns: the `Clock` protocol and the one real clock. Everything that depends on
time (budget decisions, lease heartbeats, retries, dashboard refresh) takes a
Clock, so tests drive it with `FakeClock` and run in microseconds. Nothing else
in Relay reads the wall clock or sleeps directly.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""

    def wall(self) -> float:
        """Seconds since the Unix epoch (for timestamps that cross sessions)."""

    def sleep(self, seconds: float) -> None:
        """Wait this long."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; `sleep` advances it and records the wait."""

    def __init__(self, start_wall: float = 1_800_000_000.0) -> None:
        self._now = 0.0
        self._wall0 = start_wall
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall0 + self._now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


def iso(ts: float) -> str:
    """A wall timestamp as ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
