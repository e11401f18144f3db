"""Metrics reach TensorBoard event files (and W&B when set up); without TensorBoard, one clear warning."""

from __future__ import annotations

import pytest

from runner import events as ev
from runner.tblog import TensorBoardLogger

pytest.importorskip("tensorboard", reason="reading event files back needs the tensorboard package")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def step(n: int, **kw) -> ev.StepDone:
    return ev.StepDone(**{"step": n, "target": 10, "loss": 0.5 / n, "lr": 1e-4, "step_s": 2.0, "grad_norm": 0.3, **kw})


def read_scalars(logs_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logs_dir))
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_losses_lr_grad_norm_skips_and_validation_are_written(tmp_path):
    bus = ev.EventBus()
    logger = TensorBoardLogger(tmp_path / "logs", run="r", env={})
    logger.attach(bus)
    bus.emit(step(1))
    bus.emit(step(2, skipped=True, loss=float("nan")))
    bus.emit(step(3))
    bus.emit(ev.Validated(step=3, val_loss=0.25))
    bus.emit(ev.CheckpointStaged(step=3, bytes=10, stage_s=0.1))  # flushes before the session uploads logs/
    scalars = read_scalars(tmp_path / "logs")
    assert [s for s, _ in scalars["train/loss"]] == [1, 3]  # the skipped step's NaN is not plotted
    assert scalars["train/skipped_steps"] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert scalars["val/loss"] == [(3, 0.25)]
    assert scalars["train/lr"][0][1] == pytest.approx(1e-4)
    assert scalars["train/grad_norm"][0][1] == pytest.approx(0.3)
    assert scalars["train/step_s"][0] == (1, 2.0)
    logger.close()


def test_without_tensorboard_it_is_a_no_op_that_warns_once(tmp_path):
    bus = ev.EventBus()
    seen: list[ev.Event] = []
    bus.subscribe(seen.append)
    logger = TensorBoardLogger(tmp_path / "logs", run="r", env={}, import_writer=lambda: None)
    logger.attach(bus)
    bus.emit(step(1))
    bus.emit(step(2))
    logger.close()
    assert not (tmp_path / "logs").exists()
    warnings = [e for e in seen if isinstance(e, ev.Warning)]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0].message


class FakeWandb:
    def __init__(self) -> None:
        self.init_kwargs: dict = {}
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished = True


def test_wandb_only_with_a_key_and_the_key_is_never_logged(tmp_path):
    fake = FakeWandb()
    TensorBoardLogger(tmp_path / "a", run="r", env={}, wandb_module=fake).on_event(step(1))
    assert fake.logged == []  # no key: no W&B

    env = {"WANDB_API_KEY": "secret-key-123"}
    logger = TensorBoardLogger(
        tmp_path / "b", run="naruto t4", env=env, config={"lora": {"rank": 4}}, wandb_module=fake
    )
    logger.on_event(step(1))
    logger.close()
    assert fake.init_kwargs["id"] == "naruto-t4" and fake.init_kwargs["resume"] == "allow"
    assert fake.logged[0][1] == 1 and fake.logged[0][0]["train/loss"] == 0.5
    assert "secret-key-123" not in repr(fake.init_kwargs) + repr(fake.logged)
    assert fake.finished
