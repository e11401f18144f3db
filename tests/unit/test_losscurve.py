"""The loss curve: every session's TensorBoard scalars in one PNG, session boundaries marked."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner import events as ev
from runner.losscurve import (
    COLOURS,
    SIZE_PX,
    LossHistory,
    _Axes,
    draw,
    merge_sessions,
    read_history,
    update_loss_curve,
)
from runner.storage.local import LocalStorage
from runner.tblog import TensorBoardLogger


def log_session(folder: Path, steps: range, *, val_every: int = 5) -> None:
    """What runner.tblog writes during a session (the real TensorBoard writer)."""
    logger = TensorBoardLogger(folder, env={})
    for step in steps:
        logger.on_event(ev.StepDone(step=step, target=100, loss=1.0 / step, lr=1e-4, step_s=0.1))
        if step % val_every == 0:
            logger.on_event(ev.Validated(step=step, val_loss=1.5 / step))
    logger.on_event(ev.SessionEnded(step=steps[-1], target=100, reason="budget", exit_code=75))


def test_sessions_merge_with_the_latest_value_of_a_retrained_step():
    first = ([(1, 1.0), (2, 0.9), (3, 0.8)], [(2, 1.1)])
    second = ([(3, 0.7), (4, 0.6)], [(4, 0.65)])  # resumed from the checkpoint of step 2: step 3 again
    history = merge_sessions([first, second])
    assert history.train == ((1, 1.0), (2, 0.9), (3, 0.7), (4, 0.6))
    assert history.val == ((2, 1.1), (4, 0.65))
    assert history.session_starts == (3,)
    assert merge_sessions([]).is_empty


def test_history_is_read_from_every_session_folder_in_the_order_they_ran(tmp_path):
    logs = tmp_path / "logs"
    log_session(logs / "zz-first", range(1, 11))
    time.sleep(0.05)  # the second session's events are later in wall time, though its folder sorts first
    log_session(logs / "aa-second", range(9, 21))
    history = read_history(logs)
    assert [s for s, _ in history.train] == list(range(1, 21))
    assert dict(history.train)[9] == pytest.approx(1 / 9) and history.session_starts == (9,)
    assert [s for s, _ in history.val] == [5, 10, 15, 20]
    assert read_history(tmp_path / "nothing").is_empty


def colour_columns(image: Image.Image, colour: tuple[int, int, int]) -> set[int]:
    pixels = np.asarray(image.convert("RGB"))
    ys, xs = np.nonzero(np.all(pixels == colour, axis=-1))
    return set(xs.tolist())


def test_the_png_shows_train_and_validation_loss_and_marks_each_new_session(tmp_path):
    history = merge_sessions([
        ([(s, 2.0 / s) for s in range(1, 51)], [(10, 0.3), (50, 0.1)]),
        ([(s, 2.0 / s) for s in range(51, 101)], [(100, 0.05)]),
    ])  # fmt: skip
    out = draw(history, tmp_path / "loss.png")
    image = Image.open(out)
    assert image.size == SIZE_PX
    assert colour_columns(image, COLOURS["smooth"]), "no train loss line"
    assert colour_columns(image, COLOURS["val"]), "no validation loss"
    x = round(_Axes(1, 100, 0, 2).xy(51, 0)[0])
    assert any(abs(c - x) <= 1 for c in colour_columns(image, COLOURS["session"])), "no session boundary at step 51"


def test_a_single_point_and_skipped_steps_still_draw(tmp_path):
    out = draw(LossHistory(train=((1, 0.5), (2, float("nan")))), tmp_path / "one.png")
    assert Image.open(out).size == SIZE_PX
    with pytest.raises(ValueError):
        draw(LossHistory(), tmp_path / "none.png")


def test_update_fetches_earlier_sessions_from_storage_and_stores_loss_png(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    earlier = tmp_path / "other-machine" / "logs"
    log_session(earlier / "s1", range(1, 11))
    for path in (earlier / "s1").iterdir():
        storage.put(path, f"run/logs/s1/{path.name}")
    local = tmp_path / "work" / "logs"
    time.sleep(0.05)
    log_session(local / "s2", range(11, 21))
    out = update_loss_curve(storage, "run", local, tmp_path / "work" / "loss.png")
    assert out is not None and storage.exists("run/loss.png")
    assert read_history(local).session_starts == (11,)  # s1 was fetched next to s2
    assert update_loss_curve(LocalStorage(tmp_path / "empty"), "run", tmp_path / "none", tmp_path / "x.png") is None
