"""Text-encoder LoRA on a CUDA GPU, tiny model in fp16: the encoders' forward inside the captured CUDA graph
trains like the compiled eager step, the encoders' LoRA moves, and 8-bit encoders train (blocks, no graph)."""

from __future__ import annotations

import pytest
import torch

from runner.profile import load_profile
from runner.train.cache import build_cache, open_cache
from runner.train.loop import Trainer
from runner.train.lora import TextEncoders, lora_state_dict
from runner.train.testmodels import build_tiny
from tests.gpu.forced import forced_gradient_gaps

# Each step's gradients, both trainers starting it from the same state, within 1 % (fp16 rounding: the
# captured text encoders' gradients measured 0.13-0.36 % from eager ones with the same kernels, 2026-12-07,
# bench/RESULTS.md; fp32: 1e-6). Not the drift of two free runs: that grows from any rounding (tests/gpu/forced.py).
FORCED_BOUND = 0.01

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TE = ["lora.text_encoder=true", "lora.text_encoder_lr=1e-3", "data.caption_dropout=0.2"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny", TE), folder, parts=build_tiny(0))
    return open_cache(folder)


def _trainer(cached, compile_mode: str, *extra: str) -> Trainer:
    overrides = [*TE, f'train.compile="{compile_mode}"', 'train.precision="fp16"', "train.lr=1e-3", *extra]
    parts = build_tiny(0)
    return Trainer(
        load_profile("tiny", overrides), cached, parts.unet.to("cuda"), micro_batch=2, grad_accum=2,
        gradient_checkpointing=True, device="cuda", text_encoders=TextEncoders(parts.text_encoder, parts.text_encoder_2),
    )  # fmt: skip


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    return lora_state_dict(t.unet, t.encoders)


def test_text_encoders_train_inside_the_captured_graph_like_the_eager_step(cached):
    blocks, graphs = _trainer(cached, "blocks"), _trainer(cached, "graphs")
    for step in range(5):
        a, b = blocks.step(step), graphs.step(step)
        assert abs(a.loss - b.loss) <= 1e-2 * abs(a.loss), (step, a.loss, b.loss)
    assert graphs.compiled == "graphs" and graphs.graphs is not None and graphs.graphs.captures >= 1
    sb = _state(graphs)
    te = [k for k in sb if k.startswith("text_encoder") and "lora_B" in k]
    assert any(float(sb[k].abs().max()) > 0 for k in te), "the text encoders' LoRA did not move"
    gaps = forced_gradient_gaps(_trainer(cached, "blocks"), _trainer(cached, "graphs"), 5)
    assert max(gaps) < FORCED_BOUND, gaps


def test_8bit_text_encoders_train(cached):
    pytest.importorskip("bitsandbytes")
    trainer = _trainer(cached, "auto", "lora.text_encoder_8bit=true")
    assert trainer.compiled == "blocks"
    losses = [trainer.step(s).loss for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in _state(trainer).items() if "text_encoder" in k)


MANY = 'lora.targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]'  # fmt: skip


def test_lora_on_resnet_convs_and_feed_forward_trains_under_graphs_like_blocks(cached):
    blocks, graphs = _trainer(cached, "blocks", MANY), _trainer(cached, "graphs", MANY)
    for step in range(5):
        a, b = blocks.step(step), graphs.step(step)
        assert abs(a.loss - b.loss) <= 1e-2 * abs(a.loss), (step, a.loss, b.loss)
    assert graphs.compiled == "graphs" and graphs.graphs.captures >= 1
    sb = _state(graphs)
    assert any(".conv1.lora_B" in k and float(sb[k].abs().max()) > 0 for k in sb)
    gaps = forced_gradient_gaps(_trainer(cached, "blocks", MANY), _trainer(cached, "graphs", MANY), 5)
    assert max(gaps) < FORCED_BOUND, gaps
