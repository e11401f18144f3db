"""Full-size SDXL UNet (random weights) on a CUDA GPU: LoRA rank 16, 1024 px latents, fp16 + GradScaler.

Prints seconds per optimizer step and peak GPU memory (for bench/RESULTS.md); asserts the loss is finite.
"""

from __future__ import annotations

import logging

import pytest
import torch

from runner.profile import load_profile
from runner.train.cache import CachedData
from runner.train.loop import Trainer
from runner.train.testmodels import build_random_sdxl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
log = logging.getLogger(__name__)

EXAMPLES = 6  # 5 trained + 1 held out (one in ten, rounded up)
LATENT_SIDE = 128  # 1024 px / 8


def _synthetic_cache() -> CachedData:
    gen = torch.Generator().manual_seed(0)
    size_ids = torch.tensor([1024, 1024, 0, 0, 1024, 1024])
    return CachedData(
        names=[f"x{i}" for i in range(EXAMPLES)],
        buckets=[0] * EXAMPLES,
        latents=[torch.randn(4, LATENT_SIDE, LATENT_SIDE, generator=gen) for _ in range(EXAMPLES)],
        latents_flip=None,
        time_ids=size_ids.repeat(EXAMPLES, 1),
        time_ids_flip=None,
        prompt_embeds=torch.randn(EXAMPLES, 77, 2048, generator=gen).half(),
        pooled=torch.randn(EXAMPLES, 1280, generator=gen).half(),
        empty_prompt=torch.zeros(77, 2048).half(),
        empty_pooled=torch.zeros(1280).half(),
        fingerprint="synthetic",
    )


def _trainer(optimizer: str = "adamw", gradient_checkpointing: bool = True, compile_mode: str = "off") -> Trainer:
    overrides = ["data.validation_count=2", 'train.precision="fp16"', f'train.optimizer="{optimizer}"',
                 f'train.compile="{compile_mode}"']  # fmt: skip
    profile = load_profile("sdxl-naruto-t4", overrides)
    unet = build_random_sdxl(text=False, vae=False, device="cuda", dtype=torch.float16).unet
    return Trainer(
        profile,
        _synthetic_cache(),
        unet,
        micro_batch=1,
        grad_accum=1,
        gradient_checkpointing=gradient_checkpointing,
        device="cuda",
    )


@pytest.mark.parametrize(
    ("gradient_checkpointing", "optimizer", "compile_mode"),
    [(True, "adamw", "off"), (False, "adamw", "off"), (True, "adamw8bit", "off"), (True, "adamw", "graphs")],
    ids=["ckpt", "no-ckpt", "ckpt-8bit", "ckpt-graphs"],
)
def test_full_size_lora_step_fp16(gradient_checkpointing, optimizer, compile_mode):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = _trainer(optimizer, gradient_checkpointing, compile_mode)
    assert trainer.precision == "fp16" and trainer.scaler is not None
    assert sum(p.numel() for p in trainer.params) == 23_224_320
    results = [trainer.step(s) for s in range(6)]
    torch.cuda.synchronize()
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    timed = [r.seconds for r in results[2:]]  # the first steps include cuDNN / allocator warm-up
    seconds = sum(timed) / len(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"\nSDXL LoRA r16 1024px fp16 {optimizer} ckpt={gradient_checkpointing} compile={compile_mode}: "
        f"{seconds:.3f} s/step, peak {peak:.2f} GiB, "
        f"losses {[round(r.loss, 4) for r in results]}, skipped {[r.skipped for r in results]}"
    )
    assert torch.isfinite(torch.tensor(trainer.validation_loss()))
    if gradient_checkpointing:  # a checkpointed 1024 px step leaves a 16 GB T4 room to spare, graphs or not
        assert peak < 7.0  # eager 5.8 GiB, graphs 6.6 GiB here (uncapped, after building the UNet on the GPU)


def test_resume_on_gpu_matches_within_fp16_tolerance(tmp_path):
    from runner.train.lora import lora_state_dict

    straight = _trainer()
    for s in range(4):
        straight.step(s)
    expected = lora_state_dict(straight.unet)
    del straight
    first = _trainer()
    for s in range(2):
        first.step(s)
    meta = first.save_state(tmp_path)
    del first
    resumed = _trainer()
    resumed.load_state(tmp_path, meta)
    for s in range(2, 4):
        resumed.step(s)
    got = lora_state_dict(resumed.unet)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    print(f"\nGPU resume: max |LoRA difference| after 2+2 vs 4 steps = {worst:.3e}")
    assert worst < 1e-3
