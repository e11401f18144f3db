"""The Trainer's state on disk: the LoRA weights, the optimizer's state, the LR schedule, the fp16 loss scale
and the non-finite-loss counters, saved as safetensors + JSON and restored exactly.

Owns: copying that state to host memory at once (`snapshot`, so writing it can wait for another thread),
writing the copy (`StateSnapshot.write`), and restoring it into a freshly built trainer's parts (`restore`).
Nothing random is saved: every draw is seeded by the step (runner.train.seeds), so with this state alone
the next step trains exactly what it would have without the restart.

Must not: know about storage, checkpoint policy or the step itself; a failed restore raises, never leaves
a part at its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from runner.train.lora import TextEncoders, load_lora_state_dict

LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = 1


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda _: None))


def host_copies(*groups: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Contiguous host-memory copies of each group of tensors, which later in-place updates cannot reach.

    GPU tensors are copied without blocking (into pinned memory) and waited for once, at the end:
    a wait per tensor would cost more than the ~3,400 copies of a full-size LoRA and its AdamW state.
    """
    copies, devices = [], set()
    for group in groups:
        out = {}
        for key, tensor in group.items():
            tensor = tensor.detach()
            if tensor.device.type == "cpu":
                out[key] = tensor.clone(memory_format=torch.contiguous_format)
            else:
                devices.add(tensor.device)
                out[key] = tensor.contiguous().to("cpu", non_blocking=tensor.is_cuda)
        copies.append(out)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return copies


@dataclass(frozen=True)
class StateSnapshot:
    """A training state copied out by `snapshot`; `write` saves it as `Trainer.save_state` does."""

    lora: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in (self.lora, self.optimizer) for t in group.values())

    def write(self, directory: Path) -> dict[str, Any]:
        """lora.safetensors and optimizer.safetensors into `directory`; the JSON-able rest (a copy)."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.lora, str(directory / LORA_FILE))
        save_file(self.optimizer, str(directory / OPTIMIZER_FILE))
        return json.loads(json.dumps(self.meta))


def snapshot(
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    extra: dict[str, Any],
) -> StateSnapshot:
    """The state copied to host memory now: later steps update the weights and the optimizer state in place,
    so the tensors are copied, never referenced, CPU included. `extra`: further JSON-able fields of the meta."""
    state = optimizer.state_dict()
    tensors, values = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                values[f"{index}.{name}"] = value
    meta = {
        "format": STATE_FORMAT,
        "param_groups": _json_safe(state["param_groups"]),
        "optimizer_extra": _json_safe(values),
        "lr_scheduler": _json_safe(lr_scheduler.state_dict()),
        "scaler": _json_safe(scaler.state_dict()) if scaler else None,
        **extra,
    }
    lora_copy, optimizer_copy = host_copies(lora, tensors)
    return StateSnapshot(lora_copy, optimizer_copy, meta)


def restore(
    directory: Path,
    meta: dict[str, Any],
    *,
    unet: Any,
    encoders: TextEncoders | None,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Load what `snapshot` wrote (the LoRA into the models, fp32 again; the optimizer, schedule and scaler).
    The counters in `meta` are the caller's to take back."""
    load_lora_state_dict(unet, load_file(str(directory / LORA_FILE)), encoders)
    for param in params:
        param.data = param.data.float()
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(directory / OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in meta["optimizer_extra"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
