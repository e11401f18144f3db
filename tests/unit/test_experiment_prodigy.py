"""Prodigy (train.optimizer = "prodigy"): its state — per-parameter s, p0, moments, and the step-size estimate d
kept in the param groups — goes into the checkpoint, so a resumed run continues bit-identically on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from runner.profile import load_profile
from runner.train.cache import build_cache, open_cache
from runner.train.loop import Trainer
from runner.train.lora import lora_state_dict
from runner.train.testmodels import build_tiny

pytest.importorskip("prodigyopt")
pytestmark = pytest.mark.usefixtures("one_thread")
PRODIGY = ["train.optimizer=prodigy", "train.lr=1.0", "train.warmup_steps=1", "lora.dora=true", "train.steps=6"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny", ["data.generated_count=6", "data.validation_count=0"]), folder,
                parts=build_tiny(0))  # fmt: skip
    return open_cache(folder)


def _trainer(profile, data):
    return Trainer(profile, data, build_tiny(0).unet, micro_batch=1, grad_accum=2, gradient_checkpointing=False,
                   device="cpu")  # fmt: skip


def test_prodigy_resume_is_bit_identical(cached, tmp_path):
    profile = load_profile("tiny", [*PRODIGY, "data.generated_count=6", "data.validation_count=0"])
    straight = _trainer(profile, cached)
    assert type(straight.optimizer).__name__ == "Prodigy"
    straight_losses = [straight.step(s).loss for s in range(6)]

    first = _trainer(profile, cached)
    [first.step(s) for s in range(3)]
    meta = json.loads(json.dumps(first.save_state(tmp_path)))  # what the checkpoint layer stores
    assert meta["param_groups"][0]["d_numerator"] > 0  # the estimate's running sum: restored, not reset
    del first
    resumed = _trainer(profile, cached)
    resumed.load_state(tmp_path, meta)
    assert resumed_losses(resumed) == straight_losses[3:]
    a, b = lora_state_dict(straight.unet), lora_state_dict(resumed.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("d", "d_numerator", "d_hat"):
        assert straight.optimizer.param_groups[0][key] == resumed.optimizer.param_groups[0][key]


def resumed_losses(trainer) -> list[float]:
    return [trainer.step(s).loss for s in range(3, 6)]
