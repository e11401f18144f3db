"""The exported LoRA changes images exactly as the trained one did, when loaded by diffusers.

Guards the silent failure a user hit: a LoRA file that loads with zero matched keys
(or the wrong alpha / rank scale) and so changes nothing, or changes the wrong amount.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from runner.errors import ModelError
from runner.export import CardInfo, export_lora
from runner.profile import LoraConfig, load_profile
from runner.sample import build_pipeline
from runner.train.model import attach_lora, build_tiny, lora_state_dict

# alpha ≠ rank, so a lost scale (alpha / rank = 2) shows up as a different image
LORA = LoraConfig(rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
PROMPT = "a red fox, Naruto style"


def draw(pipe) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(7)
    with torch.inference_mode():
        out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=64, width=64, generator=generator,
                   output_type="np")  # fmt: skip
    return out.images[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SDXL with a non-zero LoRA, its image, and the exported folder."""
    parts = build_tiny(seed=0)
    attach_lora(parts.unet, LORA)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in parts.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the LoRA do something
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    image = draw(build_pipeline(parts))
    out_dir = tmp_path_factory.mktemp("final")
    profile = load_profile("tiny", ["lora.alpha=8"]).to_dict()
    sessions = ({"platform": "colab", "gpu": "T4", "step_from": 0, "step_to": 2, "reason": "completed"},)
    grid = out_dir.parent / "grid.png"
    Image.new("RGB", (8, 4)).save(grid)
    card = CardInfo(name="tiny run", steps=2, sessions=sessions, sample_grid=str(grid), final_loss=0.25)
    files = export_lora(lora_state_dict(parts.unet), LORA, out_dir, profile_dict=profile, card=card)
    return image, out_dir, files


def fresh_pipe():
    return build_pipeline(build_tiny(seed=0))


def test_export_writes_the_promised_files(trained):
    _, out_dir, files = trained
    names = sorted(p.name for p in files)
    assert names == ["README.md", "pytorch_lora_weights.safetensors", "samples.png", "tiny-run.kohya.safetensors"]
    assert all(p.parent == out_dir and p.is_file() for p in files)


def test_diffusers_file_loads_and_reproduces_the_trained_model(trained):
    image, out_dir, _ = trained
    pipe = fresh_pipe()
    base = draw(pipe)
    pipe.load_lora_weights(str(out_dir))
    loaded = draw(pipe)
    assert np.abs(loaded - base).max() > 1e-2, "the LoRA loaded but changes nothing (zero matched keys?)"
    np.testing.assert_allclose(loaded, image, atol=1e-4)


def test_kohya_file_loads_and_reproduces_the_trained_model(trained):
    image, out_dir, _ = trained
    pipe = fresh_pipe()
    base = draw(pipe)
    pipe.load_lora_weights(str(out_dir), weight_name="tiny-run.kohya.safetensors")
    loaded = draw(pipe)
    assert np.abs(loaded - base).max() > 1e-2
    np.testing.assert_allclose(loaded, image, atol=1e-4)


def test_kohya_keys_carry_the_real_alpha(trained):
    _, out_dir, _ = trained
    with safe_open(str(out_dir / "tiny-run.kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    assert alphas == {8.0}


def test_model_card_says_how_it_was_trained_and_how_to_load_it(trained):
    _, out_dir, _ = trained
    card = (out_dir / "README.md").read_text()
    assert "base_model: tiny" in card
    assert "rank 4, alpha 8.0" in card
    assert "| 1 | colab | T4 | 0→2 | completed |" in card
    assert "![base vs LoRA](samples.png)" in card
    assert 'pipe.load_lora_weights("path/to/this/folder")' in card
    assert "tiny-run.kohya.safetensors" in card


def test_export_refuses_a_state_dict_that_would_match_nothing(tmp_path: Path):
    with pytest.raises(ModelError, match="lora_A"):
        export_lora({"weird.weight": torch.zeros(2)}, LORA, tmp_path, profile_dict={}, card=CardInfo("x", 1))


def test_model_card_never_lists_an_earlier_session_as_running():
    from runner.export import model_card

    sessions = (
        {"platform": "colab", "gpu": "T4", "step_from": 0, "step_to": 100, "reason": "running"},  # a checkpoint's copy
        {"platform": "kaggle", "gpu": "T4", "step_from": 100, "step_to": 200, "reason": "completed"},
    )
    card = CardInfo(name="run", steps=200, sessions=sessions)
    text = model_card(load_profile("tiny").to_dict(), card, kohya_file=None, has_grid=False)
    assert "| 1 | colab | T4 | 0→100 | killed |" in text and "running" not in text
