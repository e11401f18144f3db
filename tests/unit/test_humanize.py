"""Times and session counts read as a person would say them: minutes under an hour, a sentence for sessions."""

from __future__ import annotations

import pytest

from runner import humanize


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"), (12.4, "12 s"), (59.4, "59 s"), (59.6, "1 min"), (90, "2 min"), (12 * 60, "12 min"),
        (3599, "1 h"), (3600, "1 h"), (3600 + 5 * 60, "1 h 05 min"), (15.83 * 3600, "15 h 50 min"), (-3, "0 s"),
    ],
)  # fmt: skip
def test_duration(seconds, text):
    assert humanize.duration(seconds) == text


def test_eta_and_hours_use_minutes_under_an_hour():
    assert humanize.eta(0.01 * 3600) == "ETA 36 s"
    assert humanize.eta(720) == "ETA 12 min"
    assert humanize.eta(None) == "ETA —"
    assert humanize.hours(0.5) == "30 min"
    assert humanize.hours(12) == "12 h"


def test_session_limit():
    assert humanize.session_limit(None) == "no session limit"
    assert humanize.session_limit(0) == "no session limit"
    assert humanize.session_limit(12.0) == "session limit 12 h"
    assert humanize.session_limit(9) == "session limit 9 h"


@pytest.mark.parametrize(
    ("counts", "text"),
    [
        ({3.0: 3, 12.0: 1}, "about 3 more sessions of 3 h, or 1 of 12 h"),
        ({3.0: 1, 12.0: 1}, "about 1 more session (of 3 h or 12 h)"),
        ({3.0: 2, 12.0: 2}, "about 2 more sessions (of 3 h or 12 h)"),
        ({3.0: 0, 12.0: 0}, "no more sessions"),
        ({12.0: 4}, "about 4 more sessions (of 12 h)"),
        ({}, "sessions still needed: unknown"),
    ],
)
def test_sessions_needed_is_a_sentence(counts, text):
    assert humanize.sessions_needed(counts) == text


def test_sessions_for_rounds_up():
    assert [humanize.sessions_for(h, 3.0) for h in (0, 0.1, 3.0, 3.01, 7)] == [0, 1, 1, 2, 3]
