"""How fast the GPUs of this machine all-reduce SDXL's attention-LoRA gradients (23.2 M values, rank 16).

Run with two processes: python3 -m torch.distributed.run --nproc_per_node 2 bench/allreduce_probe.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

VALUES = 23_224_320  # trainable parameters of the bench's rank-16 LoRA


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.ones(VALUES, dtype=dtype, device="cuda")
        for _ in range(3):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 10 * 1e3
        if rank == 0:
            mb = buf.numel() * buf.element_size() / 1e6
            print(f"all-reduce {mb:.0f} MB {str(dtype).removeprefix('torch.')}: {ms:.2f} ms ({mb / ms:.1f} GB/s algbw)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
