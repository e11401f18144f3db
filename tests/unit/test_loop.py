"""The Trainer on the tiny model, CPU: learning, bit-exact resume, non-finite losses, state files, options."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from runner.errors import ProfileError, TrainingDiverged
from runner.events import EventBus, Warning
from runner.profile import load_profile
from runner.train.cache import build_cache, open_cache
from runner.train.loop import Trainer
from runner.train.lora import lora_state_dict
from runner.train.testmodels import build_tiny
from runner.train.trainstate import LORA_FILE, OPTIMIZER_FILE

TINY_SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny"), folder, parts=build_tiny(TINY_SEED))
    return open_cache(folder)


def _trainer(profile, data, *, micro_batch=2, grad_accum=2, bus=None):
    return Trainer(
        profile,
        data,
        build_tiny(TINY_SEED).unet,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        gradient_checkpointing=False,
        device="cpu",
        bus=bus,
    )


def test_loss_decreases_on_the_tiny_model(cached):
    trainer = _trainer(load_profile("tiny", ["train.lr=1e-2"]), cached)
    before = trainer.validation_loss()
    losses = [trainer.step(s).loss for s in range(30)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert trainer.validation_loss() < before - 0.05


def _equal_lora(a, b):
    sa, sb = lora_state_dict(a.unet), lora_state_dict(b.unet)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "lora.dropout=0.1",
            "data.caption_dropout=0.3",
            "train.noise_offset=0.05",
            "train.snr_gamma=5.0",
            'train.lr_scheduler="cosine"',
            "train.warmup_steps=2",
            "train.steps=6",
        ],
    ],
    ids=["plain", "dropouts-snr-schedule"],
)
def test_resume_is_bit_identical(cached, tmp_path, overrides):
    profile = load_profile("tiny", overrides)
    straight = _trainer(profile, cached)
    straight_losses = [straight.step(s).loss for s in range(6)]

    first = _trainer(profile, cached)
    [first.step(s) for s in range(3)]
    meta = json.loads(json.dumps(first.save_state(tmp_path)))  # what the checkpoint layer stores
    del first
    resumed = _trainer(profile, cached)  # a brand-new UNet and Trainer, as in the next session
    torch.manual_seed(999)  # the caller's global RNG must not matter
    resumed.load_state(tmp_path, meta)
    resumed_losses = [resumed.step(s).loss for s in range(3, 6)]

    assert resumed_losses == straight_losses[3:]
    assert _equal_lora(straight, resumed)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_a_differently_split_batch_trains_the_same_examples(cached):
    profile = load_profile("tiny")
    split_a = _trainer(profile, cached, micro_batch=2, grad_accum=2)
    split_b = _trainer(profile, cached, micro_batch=1, grad_accum=4)
    a, b = split_a.step(0), split_b.step(0)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    # the same gradient up to float summation order: measured against the gradient's own size, so a
    # harmless change of seed (other values, other magnitudes) cannot make it fail, a real difference can
    grads_a = torch.cat([p.grad.flatten() for p in split_a.params])
    grads_b = torch.cat([p.grad.flatten() for p in split_b.params])
    assert grads_a.norm() > 0
    assert (grads_a - grads_b).norm() <= 1e-4 * grads_a.norm()


def test_per_example_noise_and_timesteps_differ_between_steps_and_agree_across_splits_and_ranks(cached):
    """Every example of a step draws its own noise and timestep; the next step draws new ones; and the
    draws of a step are the same whether its batch runs as 2×2, 1×4 or on two ranks of 1×2."""
    profile = load_profile("tiny")

    def draws(trainer, step, micro_batches):
        rows = [trainer._batch(step, m) for m in range(micro_batches)]
        return torch.cat([r.noise for r in rows]), torch.cat([r.timesteps for r in rows])

    two_by_two = _trainer(profile, cached, micro_batch=2, grad_accum=2)
    one_by_four = _trainer(profile, cached, micro_batch=1, grad_accum=4)
    noise, timesteps = draws(two_by_two, 0, 2)
    assert len({tuple(n.flatten()[:8].tolist()) for n in noise}) == 4  # four examples, four noises
    next_noise, next_timesteps = draws(two_by_two, 1, 2)
    assert not torch.equal(noise, next_noise) and not torch.equal(timesteps, next_timesteps)
    other_noise, other_timesteps = draws(one_by_four, 0, 4)
    assert torch.equal(noise, other_noise) and torch.equal(timesteps, other_timesteps)
    # two ranks of micro-batch 1 × accumulation 2: global slots interleave micro-batch and rank
    ranks = [
        Trainer(
            profile,
            cached,
            build_tiny(TINY_SEED).unet,
            micro_batch=1,
            grad_accum=2,
            gradient_checkpointing=False,
            device="cpu",
            rank=rank,
            world=2,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    slots = {}
    for rank, trainer in enumerate(ranks):
        for micro in range(2):
            slots[trainer.order.slot_offset(micro, rank)] = trainer._batch(0, micro)
    assert sorted(slots) == [0, 1, 2, 3]
    assert torch.equal(torch.cat([slots[s].noise for s in range(4)]), noise)
    assert torch.equal(torch.cat([slots[s].timesteps for s in range(4)]), timesteps)


def test_state_files_are_safetensors_and_meta_is_json(cached, tmp_path):
    trainer = _trainer(load_profile("tiny"), cached)
    trainer.step(0)
    meta = trainer.save_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LORA_FILE, OPTIMIZER_FILE])
    json.dumps(meta)
    assert meta["nan_streak"] == 0 and meta["scaler"] is None
    assert meta["lr_scheduler"]["last_epoch"] == 1


def test_a_snapshot_written_later_holds_the_state_of_when_it_was_taken(cached, tmp_path):
    """The checkpoint worker writes a snapshot while training goes on: later steps must not reach it."""
    trainer = _trainer(load_profile("tiny"), cached)
    [trainer.step(s) for s in range(2)]
    meta_now = trainer.save_state(tmp_path / "now")
    snapshot = trainer.snapshot_state()
    assert snapshot.nbytes == sum((tmp_path / "now" / n).stat().st_size for n in (LORA_FILE, OPTIMIZER_FILE)) - (
        _header_bytes(tmp_path / "now" / LORA_FILE) + _header_bytes(tmp_path / "now" / OPTIMIZER_FILE)
    )
    [trainer.step(s) for s in range(2, 4)]  # weights and AdamW moments change in place
    assert snapshot.write(tmp_path / "later") == meta_now
    for name in (LORA_FILE, OPTIMIZER_FILE):
        assert (tmp_path / "later" / name).read_bytes() == (tmp_path / "now" / name).read_bytes(), name
    assert not _equal_files(trainer, tmp_path / "later"), "the steps after the snapshot changed nothing"


def _header_bytes(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 length, then the JSON header


def _equal_files(trainer, folder) -> bool:
    from safetensors.torch import load_file

    saved = load_file(str(folder / LORA_FILE))
    live = lora_state_dict(trainer.unet)
    return all(torch.equal(saved[k], live[k]) for k in saved)


def _poisoned(data):
    nan = [torch.full_like(t, float("nan")) for t in data.latents]
    return replace(data, latents=nan, latents_flip=nan)


def test_non_finite_loss_skips_the_update_then_stops(cached):
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    trainer = _trainer(load_profile("tiny", ["train.max_nan_steps=3"]), _poisoned(cached), bus=bus)
    before = lora_state_dict(trainer.unet)
    results = [trainer.step(s) for s in range(2)]
    assert all(r.skipped and r.grad_norm is None for r in results)
    assert all(torch.equal(t, before[k]) for k, t in lora_state_dict(trainer.unet).items())
    assert len([e for e in seen if isinstance(e, Warning) and e.kind == "nan"]) == 2
    with pytest.raises(TrainingDiverged, match="max_nan_steps"):
        trainer.step(2)


def test_cpu_falls_back_to_fp32_with_a_warning(cached):
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    trainer = _trainer(load_profile("tiny", ['train.precision="fp16"']), cached, bus=bus)
    assert trainer.precision == "fp32" and trainer.scaler is None
    assert any(isinstance(e, Warning) and "fp16" in e.message for e in seen)


def test_bf16_is_decided_by_the_compute_capability_not_by_emulation(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 (it counts emulation); a T4 must train in fp16."""
    from runner.train import prepare

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert prepare.resolve_precision("auto", cuda) == "fp16" and prepare.resolve_precision("bf16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100/H200
    assert prepare.resolve_precision("auto", cuda) == "bf16" and prepare.resolve_precision("fp16", cuda) == "fp16"
    assert prepare.resolve_precision("fp32", cuda) == "fp32" and prepare.resolve_precision("bf16", "cpu") == "fp32"


def test_adamw8bit_needs_cuda(cached):
    with pytest.raises(ProfileError, match="CUDA"):
        _trainer(load_profile("tiny", ['train.optimizer="adamw8bit"']), cached)


def test_v_prediction_with_min_snr_trains(cached):
    trainer = _trainer(load_profile("tiny", ['train.prediction_type="v_prediction"', "train.snr_gamma=5.0"]), cached)
    result = trainer.step(0)
    assert torch.isfinite(torch.tensor(result.loss)) and result.grad_norm is not None and not result.skipped


def test_validation_loss_is_fixed_and_excludes_training_examples(cached):
    trainer = _trainer(load_profile("tiny"), cached)
    assert trainer.validation_loss() == trainer.validation_loss()
    assert len(trainer.val_index) == 3 and not set(trainer.val_index) & set(
        trainer.train_index
    )  # 24 images: one in ten held out, rounded up
    used = {trainer.train_index[p] for s in range(20) for m in range(2) for p in trainer.order.micro(s, m)}
    assert not used & set(trainer.val_index)
