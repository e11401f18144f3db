"""Two ranks on two CUDA GPUs (NCCL), tiny SDXL-architecture model in fp16: with CUDA graphs the gradient
all-reduce is captured inside the last micro-batch's backward, bucket by bucket. Both ranks must end
with the same weights, and those must match two ranks training eagerly with one all-reduce after the
backward (to fp16 rounding): a bucket left out or reduced twice would show as a large difference.
"""

from __future__ import annotations

import faulthandler
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
STEPS = 6
RANK_TIMEOUT_S = 360  # a rank stuck in a collective dumps its threads' stacks and exits: the test fails, not hangs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, cache_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from runner.profile import load_profile
    from runner.train.cache import open_cache
    from runner.train.loop import Trainer
    from runner.train.lora import lora_state_dict
    from runner.train.testmodels import build_tiny

    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    try:
        cached = open_cache(Path(cache_dir))
        for mode in ("off", "graphs"):
            profile = load_profile("tiny", [f'train.compile="{mode}"', 'train.precision="fp16"', "train.lr=1e-3"])
            trainer = Trainer(
                profile, cached, build_tiny(0).unet, micro_batch=1, grad_accum=2, gradient_checkpointing=True,
                device=f"cuda:{rank}", rank=rank, world=2,
            )  # fmt: skip
            assert (trainer.compiled or "off") == mode
            if mode == "off":
                save_file(lora_state_dict(trainer.unet), f"{out_dir}/start.safetensors")
            losses = [trainer.step(step).loss for step in range(STEPS)]
            save_file(lora_state_dict(trainer.unet), f"{out_dir}/{mode}-{rank}.safetensors")
            torch.save(torch.tensor(losses), f"{out_dir}/{mode}-{rank}-loss.pt")
    finally:
        dist.destroy_process_group()


def test_two_gpu_graphs_reduce_inside_the_backward_and_match_eager(tmp_path):
    from runner.profile import load_profile
    from runner.train.cache import build_cache
    from runner.train.testmodels import build_tiny

    # one aspect bucket: one shape, so each rank captures two graphs (with and without the all-reduce)
    build_cache(load_profile("tiny", ["data.buckets=false"]), tmp_path / "cache", parts=build_tiny(0))
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)  # fmt: skip
    w = {name: load_file(str(tmp_path / f"{name}.safetensors")) for name in ("off-0", "off-1", "graphs-0", "graphs-1")}
    for mode in ("off", "graphs"):  # every rank applied the same averaged gradients
        assert all(torch.equal(w[f"{mode}-0"][k], w[f"{mode}-1"][k]) for k in w["off-0"]), mode
    start = load_file(str(tmp_path / "start.safetensors"))  # relative L2 gap: see test_graphs_gpu._relative_gap
    gap = sum(float((w["off-0"][k] - w["graphs-0"][k]).pow(2).sum()) for k in start) ** 0.5
    moved = sum(float((w["off-0"][k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    assert gap < 0.02 * moved, (gap, moved)  # fp16 rounding; a bucket left out or reduced twice is far above
    loss_off = torch.load(tmp_path / "off-0-loss.pt", weights_only=True)
    loss_graphs = torch.load(tmp_path / "graphs-0-loss.pt", weights_only=True)
    torch.testing.assert_close(loss_graphs, loss_off, rtol=2e-2, atol=0)  # the loss is averaged over ranks too
    assert torch.equal(loss_off, torch.load(tmp_path / "off-1-loss.pt", weights_only=True))
