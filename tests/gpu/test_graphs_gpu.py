"""CUDA graphs and compiled blocks (train.compile) on a CUDA GPU, tiny SDXL-architecture model in fp16.

A replayed micro-batch must train exactly as the same compiled micro-batch run eagerly would, with
gradient accumulation and checkpointing on, and a resumed graphs run must match a straight one.
"""

from __future__ import annotations

import pytest
import torch

from runner.profile import load_profile
from runner.train.cache import build_cache, open_cache
from runner.train.loop import Trainer
from runner.train.lora import lora_state_dict
from runner.train.testmodels import build_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny"), folder, parts=build_tiny(0))
    return open_cache(folder)


def _trainer(cached, compile_mode: str) -> Trainer:
    overrides = [f'train.compile="{compile_mode}"', 'train.precision="fp16"', "train.snr_gamma=5.0", "train.lr=1e-3"]
    return Trainer(
        load_profile("tiny", overrides), cached, build_tiny(0).unet.to("cuda"),
        micro_batch=2, grad_accum=2, gradient_checkpointing=True, device="cuda",
    )  # fmt: skip


def _worst(a: Trainer, b: Trainer) -> float:
    sa, sb = lora_state_dict(a.unet), lora_state_dict(b.unet)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _relative_gap(a: Trainer, b: Trainer, start: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a - start| over all LoRA weights (L2): how far apart two runs ended, against how far
    they moved. Adam moves each weight by about lr per step whatever its gradient's size, so a weight
    whose gradient is near zero can step the other way in either run after an fp16 rounding; the
    largest single difference says nothing, the total does."""
    sa, sb = lora_state_dict(a.unet), lora_state_dict(b.unet)
    gap = sum(float((sa[k] - sb[k]).pow(2).sum()) for k in sa) ** 0.5
    moved = sum(float((sa[k] - start[k]).pow(2).sum()) for k in sa) ** 0.5
    return gap / moved


def _grads_of_one_step(trainer: Trainer) -> list[torch.Tensor]:
    trainer._zero_grad()
    trainer._micro_batches(0)  # two accumulated micro-batches, scaled, not yet unscaled or applied
    return [p.grad.detach().clone() for p in trainer.params]


def test_graph_replay_accumulates_the_same_gradients_as_the_compiled_eager_step(cached):
    blocks, graphs = _trainer(cached, "blocks"), _trainer(cached, "graphs")
    assert blocks.compiled == "blocks" and graphs.compiled == "graphs" and graphs.graphs is not None
    expected, got = _grads_of_one_step(blocks), _grads_of_one_step(graphs)
    scale = max(float(g.abs().max()) for g in expected)
    worst = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    # GEMMs chosen under capture may round differently in fp16; a lost or doubled micro-batch would be ~50 %
    assert worst < 0.02 * scale, (worst, scale)


def test_graph_replay_trains_like_the_compiled_eager_step(cached):
    blocks, graphs = _trainer(cached, "blocks"), _trainer(cached, "graphs")
    start = lora_state_dict(blocks.unet)
    for step in range(5):
        a, b = blocks.step(step), graphs.step(step)
        assert abs(a.loss - b.loss) <= 1e-2 * abs(a.loss), (step, a.loss, b.loss)
    assert _relative_gap(blocks, graphs, start) < 0.02  # fp16 rounding; a lost or stale micro-batch is far above
    for step in range(5, 15):
        graphs.step(step)
    # one capture per batch shape (the tiny data has several aspect buckets), replayed after; none again
    assert graphs.graphs.captures == len(graphs.graphs.graphs) <= len(set(cached.buckets))


def test_graphs_resume_matches_a_straight_run(cached, tmp_path):
    straight = _trainer(cached, "graphs")
    for step in range(4):
        straight.step(step)
    first = _trainer(cached, "graphs")
    for step in range(2):
        first.step(step)
    meta = first.save_state(tmp_path)
    resumed = _trainer(cached, "graphs")
    resumed.load_state(tmp_path, meta)
    for step in range(2, 4):
        resumed.step(step)
    assert _worst(straight, resumed) < 1e-5


def test_moved_parameters_are_noticed_and_captured_again(cached):
    trainer = _trainer(cached, "graphs")
    trainer.step(0)
    before = trainer.graphs.captures
    for param in trainer.params:  # storage replaced, as a state load that reallocates would do
        param.data = param.data.clone()
    result = trainer.step(0)  # the same batches: only the moved buffers can cause a capture
    assert trainer.graphs.captures > before and torch.isfinite(torch.tensor(result.loss))
    assert all(p.grad.data_ptr() != 0 for p in trainer.params)
