"""The Trainer with LoRA on both text encoders, tiny model on CPU: its own optimizer group and rate, the
encoders' LoRA trained from cached token ids, caption dropout to the empty caption's ids, bit-exact resume
with the encoders' state, and clear errors for what cannot run here."""

from __future__ import annotations

import json

import pytest
import torch

from runner.errors import ModelError, ProfileError
from runner.profile import load_profile
from runner.train.cache import build_cache, open_cache
from runner.train.loop import Trainer
from runner.train.lora import TextEncoders, lora_state_dict
from runner.train.testmodels import build_tiny

TE = ["lora.text_encoder=true", "lora.text_encoder_lr=5e-3", "data.generated_count=8", "data.validation_count=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-te")
    build_cache(load_profile("tiny", TE), folder, parts=build_tiny(0))
    return open_cache(folder)


def _trainer(data, *extra: str) -> Trainer:
    parts = build_tiny(0)
    return Trainer(
        load_profile("tiny", [*TE, *extra]), data, parts.unet, micro_batch=2, grad_accum=2,
        gradient_checkpointing=False, device="cpu", text_encoders=TextEncoders(parts.text_encoder, parts.text_encoder_2),
    )  # fmt: skip


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return lora_state_dict(trainer.unet, trainer.encoders)


def test_text_encoders_train_in_their_own_group_at_their_own_rate(cached):
    trainer = _trainer(cached)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 5e-3]
    assert len(trainer.optimizer.param_groups[1]["params"]) == len(trainer.text_params) > 0
    before = {k: v.clone() for k, v in _state(trainer).items()}  # on CPU the state dict shares the weights' memory
    [trainer.step(s) for s in range(2)]
    after = _state(trainer)
    moved = [k for k in after if k.startswith("text_encoder") and not torch.equal(after[k], before[k])]
    assert any(k.startswith("text_encoder.") for k in moved) and any(k.startswith("text_encoder_2.") for k in moved)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.text_params)


def test_resume_with_text_encoders_is_bit_identical(cached, tmp_path):
    extra = ("data.caption_dropout=0.3", 'train.lr_scheduler="cosine"', "train.warmup_steps=1", "train.steps=5")
    straight = _trainer(cached, *extra)
    straight_losses = [straight.step(s).loss for s in range(5)]
    first = _trainer(cached, *extra)
    [first.step(s) for s in range(2)]
    meta = json.loads(json.dumps(first.save_state(tmp_path)))
    del first
    resumed = _trainer(cached, *extra)
    torch.manual_seed(123)
    resumed.load_state(tmp_path, meta)
    assert [resumed.step(s).loss for s in range(2, 5)] == straight_losses[2:]
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in straight.optimizer.param_groups]


def test_caption_dropout_feeds_the_empty_captions_ids_as_a_function_of_the_step(cached):
    trainer = _trainer(cached, "data.caption_dropout=0.5")
    batches = [trainer._batch(s, m) for s in range(6) for m in range(2)]
    again = [trainer._batch(s, m) for s in range(6) for m in range(2)]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(batches, again, strict=True))
    assert all(b.prompt is None and b.ids.shape == (2, 2, 77) for b in batches)
    rows = [row for b in batches for row in b.ids]
    dropped = sum(torch.equal(row, cached.empty_ids) for row in rows)
    assert 0 < dropped < len(rows)


def test_validation_loss_encodes_with_the_trained_encoders(cached):
    trainer = _trainer(cached)
    assert trainer.validation_loss() == trainer.validation_loss()
    assert all(module.training for _, module in trainer.encoders.named())


def test_8bit_text_encoders_on_cpu_are_refused_naming_the_key(cached):
    with pytest.raises(ProfileError, match="lora.text_encoder_8bit") as info:
        _trainer(cached, "lora.text_encoder_8bit=true")
    assert info.value.exit_code == 2 and "CUDA" in str(info.value)


def test_a_cache_without_token_ids_is_refused_with_what_to_do(cached):
    from dataclasses import replace

    with pytest.raises(ModelError, match="token ids"):
        _trainer(replace(cached, ids=None, empty_ids=None))
