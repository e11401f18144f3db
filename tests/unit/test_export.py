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
from safetensors.torch import load_file

from runner.errors import ModelError
from runner.export import CardInfo, export_lora, save_stable
from runner.profile import LoraConfig, load_profile
from runner.sample import build_pipeline
from runner.train.cache import tokenize
from runner.train.lora import TextEncoders, attach_lora, attach_text_encoder_lora, lora_state_dict, text_conditioning
from runner.train.testmodels import build_tiny

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
    curve = out_dir.parent / "run-loss.png"  # the run's curve (RUN/loss.png), drawn by the session
    Image.new("RGB", (8, 4)).save(curve)
    card = CardInfo(name="tiny run", steps=2, sessions=sessions, sample_grid=str(grid), final_loss=0.25,
                    loss_curve=str(curve))  # fmt: skip
    files = export_lora(lora_state_dict(parts.unet), LORA, out_dir, profile_dict=profile, card=card)
    return image, out_dir, files


def fresh_pipe():
    return build_pipeline(build_tiny(seed=0))


def test_export_writes_the_promised_files(trained):
    _, out_dir, files = trained
    names = sorted(p.name for p in files)
    assert names == ["README.md", "loss.png", "pytorch_lora_weights.safetensors", "samples.png",
                     "tiny-run.kohya.safetensors"]  # fmt: skip
    assert all(p.parent == out_dir and p.is_file() for p in files)


def test_equal_tensors_give_byte_identical_files(trained, tmp_path):
    """Users compare exported files by hash: the header must not depend on a hash map's order."""
    _, out_dir, _ = trained
    sd = load_file(str(out_dir / "pytorch_lora_weights.safetensors"))
    metadata = {f"key{i}": str(i) for i in range(12)}  # many keys: a random order shows up at once
    written = []
    for i in range(4):
        path = tmp_path / f"copy{i}.safetensors"
        save_stable(sd, path, metadata=dict(reversed(metadata.items())) if i % 2 else metadata)
        written.append(path.read_bytes())
    assert all(data == written[0] for data in written)
    with safe_open(str(tmp_path / "copy1.safetensors"), "pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(k), sd[k]) for k in sd)


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
    assert "![loss curve](loss.png)" in card


def test_model_card_says_which_file_for_which_tool(trained, trained_all):
    card = (trained[1] / "README.md").read_text()
    assert "| ComfyUI, AUTOMATIC1111 / Forge | `tiny-run.kohya.safetensors` |" in card
    assert "| diffusers (`load_lora_weights`) | `pytorch_lora_weights.safetensors` |" in card
    assert "ComfyUI does not apply its UNet part" in card
    assert "LoraLoaderModelOnly" not in card  # a UNet-only LoRA loses nothing in the model-only node
    with_encoders = (trained_all[2] / "README.md").read_text()
    assert "model-only node (*LoraLoaderModelOnly*) drops that part" in with_encoders


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


# --- LoRA on more than attention, and on both text encoders ------------------------------------------------

MANY = LoraConfig(
    rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in",
                                "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj"),
    text_encoder=True, text_encoder_rank=2, text_encoder_alpha=6.0,  # its own scale: 3, the UNet's 2
    text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
)  # fmt: skip


def encoder_outputs(parts) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(parts, [PROMPT, ""])
    with torch.no_grad():
        return text_conditioning(TextEncoders(parts.text_encoder, parts.text_encoder_2), ids[:, 0], ids[:, 1])


@pytest.fixture(scope="module")
def trained_all(tmp_path_factory):
    """A tiny SDXL with non-zero LoRA on many UNet layers and both text encoders; its image, its text
    encoders' outputs, and the exported folder."""
    parts = build_tiny(seed=0)
    attach_lora(parts.unet, MANY)
    encoders = TextEncoders(parts.text_encoder, parts.text_encoder_2)
    attach_text_encoder_lora(encoders, MANY)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (parts.unet, parts.text_encoder, parts.text_encoder_2):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    image, outputs = draw(build_pipeline(parts)), encoder_outputs(parts)
    out_dir = tmp_path_factory.mktemp("final-all")
    profile = load_profile("tiny", ["lora.alpha=8", "lora.text_encoder=true", "lora.text_encoder_lr=5e-3"]).to_dict()
    files = export_lora(lora_state_dict(parts.unet, encoders), MANY, out_dir, profile_dict=profile,
                        card=CardInfo(name="all", steps=2))  # fmt: skip
    return image, outputs, out_dir, files, len(lora_state_dict(parts.unet, encoders))


def lora_layers(module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


@pytest.mark.parametrize("weight_name", ["pytorch_lora_weights.safetensors", "all.kohya.safetensors"])
def test_many_layer_and_text_encoder_lora_loads_into_diffusers_and_reproduces_the_trained_model(
    trained_all, weight_name
):
    image, (prompt, pooled), out_dir, _, tensors = trained_all
    parts = build_tiny(seed=0)
    pipe = build_pipeline(parts)
    base_image, (base_prompt, base_pooled) = draw(pipe), encoder_outputs(parts)
    pipe.load_lora_weights(str(out_dir), weight_name=weight_name)
    # every LoRA module of the file found its layer: an A/B pair per layer
    assert sum(lora_layers(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)) * 2 == tensors
    loaded_prompt, loaded_pooled = encoder_outputs(parts)
    assert (loaded_prompt - base_prompt).abs().max() > 1e-2 and (loaded_pooled - base_pooled).abs().max() > 1e-2
    torch.testing.assert_close(loaded_prompt, prompt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded_pooled, pooled, atol=1e-5, rtol=1e-5)
    loaded = draw(pipe)
    assert np.abs(loaded - base_image).max() > 1e-2
    np.testing.assert_allclose(loaded, image, atol=1e-4)


def test_kohya_file_names_text_encoders_and_convs_as_kohya_does(trained_all):
    _, _, out_dir, _, _ = trained_all
    with safe_open(str(out_dir / "all.kohya.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
    assert float(tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 6.0
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 8.0
    down, up = (tensors[f"lora_unet_down_blocks_0_resnets_0_conv1.lora_{p}.weight"] for p in ("down", "up"))
    assert down.shape == (4, 32, 3, 3) and up.shape == (32, 4, 1, 1)
    with safe_open(str(out_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)


def test_model_card_lists_the_trained_parts_and_their_rates(trained_all):
    _, _, out_dir, _, _ = trained_all
    card = (out_dir / "README.md").read_text()
    assert "UNet LoRA at lr 0.01; both text encoders (CLIP-L, CLIP-G) LoRA at lr 0.005" in card
    assert "text-encoder LoRA: rank" in card


def test_dora_on_the_text_encoders_exports_the_diffusers_file_only(tmp_path):
    cfg = LoraConfig(rank=4, alpha=4, dora=True, text_encoder=True)
    parts = build_tiny(seed=0)
    attach_lora(parts.unet, cfg)
    encoders = TextEncoders(parts.text_encoder, parts.text_encoder_2)
    attach_text_encoder_lora(encoders, cfg)
    files = export_lora(lora_state_dict(parts.unet, encoders), cfg, tmp_path, profile_dict={}, card=CardInfo("d", 1))
    assert sorted(p.name for p in files) == ["README.md", "pytorch_lora_weights.safetensors"]
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("text_encoder.") and "lora_magnitude_vector" in k for k in f.keys())
