"""Kaggle's weekly GPU quota, counted from the run's own session records.

Owns: the hours left this week on an account (`kaggle_quota_left_h`) and the warning when the run needs more
(`quota_warning`). The account's live figure comes from Kaggle's API (runner.chain); this is the fallback.
Must not: call Kaggle, act, or read the real clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

KAGGLE_WEEKLY_GPU_H = 30.0  # Kaggle's "floating" weekly GPU quota (The Kaggle Book)
WEEK_S = 7 * 24 * 3600.0


def _wall(value: Any) -> float:
    """A wall time as Unix seconds, from a number or an ISO 8601 string."""
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)


def kaggle_quota_left_h(
    sessions: Iterable[dict], now_wall: float, account: str, quota_h: float = KAGGLE_WEEKLY_GPU_H
) -> float:
    """GPU hours left this week on a Kaggle account, from the run's session records.

    Counts records with platform "kaggle" of this account (records without an
    account count too: better to warn early) over the last 7 days, as
    end − start: the quota counts a session's hours, whatever its GPU count, as
    GetAcceleratorQuotaStatistics reports it (`kaggle quota`, kaggle-cli PR
    #1029); no public source says a T4 ×2 session uses it twice as fast. Record
    keys: platform, account, start_wall, end_wall (a session without an end
    counts until `now_wall`).
    """
    since = now_wall - WEEK_S
    used_s = 0.0
    for record in sessions:
        if record.get("platform") != "kaggle" or record.get("account", account) not in (account, "", None):
            continue
        start = max(_wall(record.get("start_wall", now_wall)), since)
        end = min(_wall(record["end_wall"]) if record.get("end_wall") is not None else now_wall, now_wall)
        used_s += max(0.0, end - start)
    return max(0.0, quota_h - used_s / 3600.0)


def quota_warning(quota_left_h: float, steps_left: int, step_s: float, gpu_count: int = 1) -> str | None:
    """A warning when the steps still to train need more Kaggle GPU hours than the week has left (session hours:
    `gpu_count` is kept for callers and changes nothing, see `kaggle_quota_left_h`)."""
    needed_h = steps_left * step_s / 3600.0
    if needed_h <= quota_left_h:
        return None
    if quota_left_h <= 0:
        return (
            "no Kaggle GPU quota left this week: this session may be stopped at any moment; "
            "continue the run on Colab, or wait for the weekly reset"
        )
    return (
        f"the run needs about {needed_h:.1f} GPU h more ({steps_left} steps × {step_s:.1f} s), "
        f"but only {quota_left_h:.1f} h of "
        "this week's Kaggle quota is left: the rest will wait for the reset, or continue on Colab"
    )
