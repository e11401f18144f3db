"""How much of torch.compile's first step the carried compile cache saves, on the tiny UNet (CPU or GPU).

Run twice, each with its own empty inductor folder, so the second process is a fresh machine but for the
artifacts file (what Relay stores as RUN/compile-cache/KEY/artifacts.bin):
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind1 python3 bench/compile_cache_roundtrip.py save /tmp/art.bin
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind2 python3 bench/compile_cache_roundtrip.py load /tmp/art.bin
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from runner.profile import LoraConfig
from runner.train import compiling, lora, testmodels


def main(mode: str, path: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if mode == "load":
        compiling.load_compile_artifacts(path.read_bytes())
    torch.manual_seed(0)
    unet = testmodels.build_tiny(0).unet.to(device)
    lora.attach_lora(unet, LoraConfig(rank=4, alpha=4))
    unet.enable_gradient_checkpointing()
    unet.train()
    compiling.compile_blocks(unet)
    x, t, enc = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 64)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    x, t, enc, cond = x.to(device), t.to(device), enc.to(device), {k: v.to(device) for k, v in cond.items()}
    t0 = time.perf_counter()
    unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=cond).sample.pow(2).mean().backward()
    print(f"{mode}: first compiled step {time.perf_counter() - t0:.1f} s on {device}")
    if mode == "save":
        blob = compiling.compile_artifacts()
        path.write_bytes(blob or b"")
        print(f"artifacts: {len(blob or b'')} bytes")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
