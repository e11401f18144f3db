"""How long a full-size checkpoint blocks training, and how long its background write takes, on this CPU.

    python3 bench/checkpoint_blocking.py [REPEATS]

The LoRA (rank 16 on to_q,to_k,to_v,to_out.0 of the full SDXL UNet: 23.2 M fp32 parameters) is
attached to the UNet built on the meta device, so only the LoRA tensors exist in memory. An AdamW
step gives it its two moments, as in training. Then, REPEATS times:
- blocking: `runner.train.trainstate.host_copies` of the LoRA and the optimizer state, which is what
  `Trainer.snapshot_state` does before training goes on (on a GPU it is a copy to pinned memory instead);
- background: `StateSnapshot.write` and the manifest (safetensors files, sha256), which the upload
  worker does while the next steps train.
On a GPU machine, `relay bench` reports the same two figures (checkpoint_save_s, checkpoint_write_s).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict

from runner.checkpoint.manifest import write_manifest
from runner.profile import load_profile
from runner.train.lora import attach_lora
from runner.train.model import bundled_config
from runner.train.trainstate import StateSnapshot, host_copies


def full_size_lora() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config("unet"))
    attach_lora(unet, load_profile("sdxl-naruto-t4").lora)
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            module.to_empty(device="cpu")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        torch.nn.init.normal_(p, std=0.01)
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.step()
    return unet, optimizer


def main(repeats: int) -> None:
    unet, optimizer = full_size_lora()
    moments = {
        f"{i}.{k}": v
        for i, s in optimizer.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    lora = get_peft_model_state_dict(unet)
    print(f"LoRA tensors {len(lora)}, {sum(t.numel() for t in lora.values()) / 1e6:.2f} M parameters; "
          f"optimizer tensors {len(moments)}")  # fmt: skip
    blocking, background = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            lora_copy, optimizer_copy = host_copies(get_peft_model_state_dict(unet), moments)
            t1 = time.perf_counter()
            snapshot = StateSnapshot(lora_copy, optimizer_copy, {"bench": True})
            folder = Path(tmp) / f"step-{i}"
            snapshot.write(folder)
            write_manifest(folder, {"bench": True})
            t2 = time.perf_counter()
            blocking.append(t1 - t0)
            background.append(t2 - t1)
            print(f"{snapshot.nbytes / 1e6:.0f} MB: blocking {t1 - t0:.3f} s, background write {t2 - t1:.3f} s")
    print(f"median of {repeats}: blocking {statistics.median(blocking):.3f} s, "
          f"background {statistics.median(background):.3f} s")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
