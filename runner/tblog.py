"""Training metrics to TensorBoard event files (and Weights & Biases when set up).

Owns: an EventBus subscriber that writes loss, validation loss, learning rate,
grad norm, skipped steps, step time, GPU memory and checkpoint costs as scalars
into a local logs folder (the session uploads that folder). TensorBoard's
writer comes from torch.utils.tensorboard (the `tensorboard` package is one of
Relay's dependencies: every run keeps its loss history, which runner.losscurve
draws); where it cannot be imported this is a no-op that says so once, as a
Warning event. W&B is used only when `wandb` imports and WANDB_API_KEY is set;
wandb reads the key from the environment itself, and it is never logged.

Must not: decide anything, touch storage, or let a logging failure stop
training (the EventBus already contains subscriber errors).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner import events as ev

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 30  # the writer's own background flush; we also flush before each checkpoint upload
WANDB_PROJECT = "relay"


def _import_summary_writer() -> Any:
    """torch.utils.tensorboard.SummaryWriter, or None when tensorboard is not installed."""
    try:
        module = importlib.import_module("torch.utils.tensorboard")
    except ImportError:  # torch without the tensorboard package raises ImportError here
        return None
    return module.SummaryWriter


def _import_wandb() -> Any:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        return None


class TensorBoardLogger:
    """Subscribe with `attach(bus)` (or `bus.subscribe(logger.on_event)`); SessionEnded closes it."""

    def __init__(
        self, logs_dir: Path, *, run: str = "relay", env: Mapping[str, str] | None = None, config: dict | None = None,
        import_writer: Callable[[], Any] = _import_summary_writer, wandb_module: Any = None,
    ) -> None:  # fmt: skip
        """env: where WANDB_API_KEY is looked up; None reads the process environment (the session edge).
        import_writer / wandb_module: injected by tests (SummaryWriter class or None; the wandb module)."""
        env = dict(os.environ) if env is None else env
        self.logs_dir = Path(logs_dir)
        self.run = run
        self.skipped_steps = 0
        factory = import_writer()
        self.writer = None
        self.unavailable = ""
        if factory is None:
            self.unavailable = "TensorBoard logs are off: `pip install tensorboard` to get them"
            log.info(self.unavailable)  # users see it once, as the Warning event attach() emits
        else:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.writer = factory(log_dir=str(self.logs_dir), flush_secs=FLUSH_EVERY_S)
        self.wandb_run = self._start_wandb(wandb_module, env, config or {})

    def _start_wandb(self, wandb_module: Any, env: Mapping[str, str], config: dict) -> Any:
        if not env.get("WANDB_API_KEY"):
            return None
        wandb = wandb_module or _import_wandb()
        if wandb is None:
            log.info("WANDB_API_KEY is set but wandb is not installed; W&B logging is off")
            return None
        # resume="allow" with the run name as id: every session of the run appends to one W&B run
        return wandb.init(project=env.get("WANDB_PROJECT", WANDB_PROJECT), name=self.run, id=_wandb_id(self.run),
                          resume="allow", config=config, dir=str(self.logs_dir))  # fmt: skip

    def attach(self, bus: ev.EventBus) -> None:
        bus.subscribe(self.on_event)
        if self.unavailable:
            bus.emit(ev.Warning(message=self.unavailable, kind="logging"))

    def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StepDone):
            self._on_step(event)
        elif isinstance(event, ev.Validated):
            self._scalars(event.step, {"val/loss": event.val_loss})
        elif isinstance(event, ev.CheckpointStaged):
            self.flush()  # the session uploads the logs folder with the checkpoint
        elif isinstance(event, ev.CheckpointCommitted):
            self._scalars(event.step, {"checkpoint/upload_s": event.upload_s, "checkpoint/mb": event.bytes / 1e6})
        elif isinstance(event, ev.SessionEnded):
            self.close()  # nothing is logged after the session ends

    def _on_step(self, e: ev.StepDone) -> None:
        self.skipped_steps += int(e.skipped)
        values = {"train/lr": e.lr, "train/step_s": e.step_s, "train/skipped_steps": self.skipped_steps}
        if not e.skipped:
            values["train/loss"] = e.loss
        if e.grad_norm is not None:
            values["train/grad_norm"] = e.grad_norm
        if e.vram_peak_gib is not None:
            values["gpu/vram_peak_gib"] = e.vram_peak_gib
        self._scalars(e.step, values)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_id(run: str) -> str:
    """W&B run ids allow letters, digits, - and _."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run) or "relay"
