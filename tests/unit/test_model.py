"""SDXL parts and LoRA: the tiny builder, LoRA attach / save / load, the full-size parameter count, load errors."""

from __future__ import annotations

import json

import pytest
import torch

from runner.errors import ModelError
from runner.profile import LoraConfig, ModelConfig
from runner.train import loading, lora, model, testmodels

TINY_LORA = LoraConfig(rank=4, alpha=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_tiny_is_deterministic_from_seed():
    a, b, c = testmodels.build_tiny(0), testmodels.build_tiny(0), testmodels.build_tiny(1)
    for name, tensor in a.unet.state_dict().items():
        assert torch.equal(tensor, b.unet.state_dict()[name])
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert torch.equal(a.text_encoder_2.text_projection.weight, b.text_encoder_2.text_projection.weight)


def test_build_tiny_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    testmodels.build_tiny(5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_parts_run_in_the_sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    parts = testmodels.build_tiny(0)
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=parts.noise_scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_tokenizer_pads_to_77_with_start_and_end_tokens():
    tokenizer = testmodels.build_tokenizer()
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids


def test_attach_lora_counts_trainable_fp32_params_and_freezes_the_rest():
    unet = testmodels.build_tiny(0).unet.to(torch.float16)
    count = lora.attach_lora(unet, TINY_LORA)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert count == sum(p.numel() for p in trainable) > 0
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert unet.conv_in.weight.dtype == torch.float16 and not unet.conv_in.weight.requires_grad


def test_lora_state_dict_round_trips_into_a_fresh_unet():
    source = testmodels.build_tiny(0).unet
    lora.attach_lora(source, TINY_LORA)
    with torch.no_grad():
        for p in lora.lora_parameters(source):
            p.add_(torch.randn_like(p))
    state = lora.lora_state_dict(source)
    assert all("lora_A" in k or "lora_B" in k for k in state)
    assert all(".default." not in k for k in state)  # peft format: no adapter name in keys
    target = testmodels.build_tiny(0).unet
    lora.attach_lora(target, TINY_LORA)
    lora.load_lora_state_dict(target, state)
    for key, tensor in lora.lora_state_dict(target).items():
        assert torch.equal(tensor, state[key])


def test_loading_a_lora_of_another_rank_is_refused():
    unet = testmodels.build_tiny(0).unet
    lora.attach_lora(unet, TINY_LORA)
    other = testmodels.build_tiny(0).unet
    lora.attach_lora(other, LoraConfig(rank=8, alpha=8, targets=("to_q",)))
    with pytest.raises(ModelError, match="do not match"):
        lora.load_lora_state_dict(unet, lora.lora_state_dict(other))


def test_full_sdxl_rank16_lora_param_count_on_meta():
    count = lora.count_lora_params(LoraConfig(rank=16, alpha=32))
    assert count == 23_224_320  # 22.5 M < count < 23.5 M, as published for SDXL rank 16 attention LoRA


def test_bundled_unet_config_is_consistent_with_text_time_conditioning():
    unet = json.loads((model.CONFIGS_DIR / "unet" / "config.json").read_text())
    te1 = json.loads((model.CONFIGS_DIR / "text_encoder" / "config.json").read_text())
    te2 = json.loads((model.CONFIGS_DIR / "text_encoder_2" / "config.json").read_text())
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == unet["addition_time_embed_dim"] * 6 + te2["projection_dim"]


def test_text_encoder_lora_has_its_own_rank_and_targets_and_round_trips_under_prefixes():
    cfg = LoraConfig(rank=4, alpha=4, text_encoder=True, text_encoder_rank=2, text_encoder_alpha=3,
                     text_encoder_targets=("q_proj", "fc1"))  # fmt: skip
    parts = testmodels.build_tiny(0)
    lora.attach_lora(parts.unet, cfg)
    encoders = lora.TextEncoders(parts.text_encoder, parts.text_encoder_2)
    count = lora.attach_text_encoder_lora(encoders, cfg)
    assert count == sum(p.numel() for _, e in encoders.named() for p in lora.lora_parameters(e))
    assert all(not p.requires_grad for n, p in parts.text_encoder.named_parameters() if "lora_" not in n)
    state = lora.lora_state_dict(parts.unet, encoders)
    te = [k for k in state if k.startswith(("text_encoder.", "text_encoder_2."))]
    assert te and all(k.endswith(("q_proj.lora_A.weight", "q_proj.lora_B.weight", "fc1.lora_A.weight",
                                   "fc1.lora_B.weight")) for k in te)  # fmt: skip
    assert all(state[k].shape[0] == 2 for k in te if k.endswith("lora_A.weight"))  # rank 2, not the UNet's 4
    assert any(k.startswith("text_encoder_2.") for k in te)
    other = testmodels.build_tiny(0)
    lora.attach_lora(other.unet, cfg)
    other_encoders = lora.TextEncoders(other.text_encoder, other.text_encoder_2)
    lora.attach_text_encoder_lora(other_encoders, cfg)
    state = {k: v + 1 for k, v in state.items()}
    lora.load_lora_state_dict(other.unet, state, other_encoders)
    assert all(torch.equal(v, state[k]) for k, v in lora.lora_state_dict(other.unet, other_encoders).items())
    with pytest.raises(ModelError, match="lora.text_encoder"):  # a UNet-only model refuses text-encoder weights
        lora.load_lora_state_dict(other.unet, state)


def test_text_encoder_targets_that_match_nothing_are_refused():
    parts = testmodels.build_tiny(0)
    encoders = lora.TextEncoders(parts.text_encoder, parts.text_encoder_2)
    with pytest.raises(ModelError, match="text_encoder_targets"):
        lora.attach_text_encoder_lora(encoders, LoraConfig(text_encoder=True, text_encoder_targets=("nope",)))


def test_lora_on_resnet_convs_feed_forward_and_projections_attaches():
    targets = ("to_q", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "time_emb_proj")  # fmt: skip
    unet = testmodels.build_tiny(0).unet
    lora.attach_lora(unet, LoraConfig(rank=4, alpha=4, targets=targets))
    keys = lora.get_lora_keys(unet)
    for target in targets:
        assert any(f".{target}.lora_A.weight" in k for k in keys), target
    conv = next(k for k in keys if k.endswith("resnets.0.conv1.lora_A.weight"))
    assert lora.lora_state_dict(unet)[conv].dim() == 4  # a conv LoRA: down is k×k, up is 1×1


def test_load_parts_tiny_returns_only_the_requested_pieces():
    parts = loading.load_parts(ModelConfig(base="tiny"), unet=False)
    assert parts.unet is None
    assert parts.vae is not None and parts.text_encoder_2 is not None and parts.tokenizer is not None
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert parts.noise_scheduler.config.num_train_timesteps == 1000


def test_load_parts_names_the_missing_path(tmp_path):
    missing = tmp_path / "nope"
    missing.mkdir()
    with pytest.raises(ModelError, match="nope") as info:
        loading.load_parts(ModelConfig(base=str(missing)), text=False, vae=False)
    assert "HF_TOKEN" in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        loading.load_parts(ModelConfig(base=str(tmp_path / "model.safetensors")))


def test_load_parts_reads_a_local_diffusers_folder(tmp_path):
    parts = testmodels.build_tiny(3)
    parts.unet.save_pretrained(tmp_path / "unet")
    parts.vae.save_pretrained(tmp_path / "vae")
    loaded = loading.load_parts(ModelConfig(base=str(tmp_path)), text=False)
    assert torch.equal(loaded.unet.conv_in.weight, parts.unet.conv_in.weight)
    assert loaded.text_encoder is None
    separate = testmodels.build_tiny(4).vae  # e.g. the fp16-fix VAE, saved as a plain VAE folder
    separate.save_pretrained(tmp_path / "other-vae")
    with_vae = loading.load_parts(
        ModelConfig(base=str(tmp_path), vae=str(tmp_path / "other-vae")), text=False, unet=False
    )
    assert torch.equal(with_vae.vae.encoder.conv_in.weight, separate.encoder.conv_in.weight)


def test_load_parts_reads_the_unet_and_vae_of_a_single_file_checkpoint(tmp_path, monkeypatch):
    """A .safetensors file as A1111 / ComfyUI users have it: UNet and VAE are converted from that layout
    with the bundled configs (here the tiny model's, standing in for SDXL's), with no download."""
    import shutil

    from safetensors.torch import save_file

    from tests.ldm_format import unet_to_single_file, vae_to_single_file

    parts = testmodels.build_tiny(3)
    shutil.copytree(model.CONFIGS_DIR, tmp_path / "configs")
    parts.unet.save_config(tmp_path / "configs" / "unet")  # the tiny model's configs in place of SDXL's
    parts.vae.save_config(tmp_path / "configs" / "vae")
    monkeypatch.setattr(loading, "CONFIGS_DIR", tmp_path / "configs")  # where the single-file loader reads it
    want = {"unet": parts.unet.state_dict(), "vae": parts.vae.state_dict()}
    levels = len(parts.vae.config.down_block_types)
    stored = {**unet_to_single_file(want["unet"], parts.unet.config.layers_per_block),
              **vae_to_single_file(want["vae"], levels)}  # fmt: skip
    save_file(stored, str(tmp_path / "sdxl.safetensors"))
    loaded = loading.load_parts(ModelConfig(base=str(tmp_path / "sdxl.safetensors")), text=False)
    for name in ("unet", "vae"):
        got = getattr(loaded, name).state_dict()
        assert got.keys() == want[name].keys(), name
        assert all(torch.equal(got[k], want[name][k]) for k in got), f"a {name} weight landed in the wrong place"
    assert loaded.vae.config.scaling_factor == parts.vae.config.scaling_factor  # from the config, not a default
    save_file({"model.diffusion_model.nonsense.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="other.safetensors"):
        loading.load_parts(ModelConfig(base=str(tmp_path / "other.safetensors")), text=False, vae=False)


def test_a_full_size_single_file_layout_converts_to_every_weight_with_the_bundled_configs():
    """The same layout at full size (SDXL's first UNet level has no attention; 2 layers per level; 4 VAE
    levels): diffusers' converters, given the bundled configs, put each stored tensor where it came from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from tests.ldm_format import unet_to_single_file, vae_to_single_file

    def config(name):
        return json.loads((model.CONFIGS_DIR / name / "config.json").read_text())

    with torch.device("meta"):
        unet_names = list(UNet2DConditionModel.from_config(config("unet")).state_dict())
        vae_shapes = {k: v.shape for k, v in AutoencoderKL.from_config(config("vae")).state_dict().items()}
    tagged = {name: torch.tensor(i) for i, name in enumerate(unet_names)}  # each value says where it came from
    converted = convert_ldm_unet_checkpoint(
        unet_to_single_file(tagged, config("unet")["layers_per_block"]), config("unet")
    )
    assert sorted(converted) == sorted(unet_names)
    assert all(int(converted[name]) == i for i, name in enumerate(unet_names))
    tagged = {name: torch.full(shape, float(i)) if len(shape) == 2 else torch.tensor(float(i))
              for i, (name, shape) in enumerate(vae_shapes.items())}  # fmt: skip
    stored = vae_to_single_file(tagged, len(config("vae")["down_block_types"]))
    converted = convert_ldm_vae_checkpoint(stored, config("vae"))
    assert sorted(converted) == sorted(vae_shapes)
    assert all(converted[name].shape == tagged[name].shape and converted[name].flatten()[0] == i
               for i, name in enumerate(vae_shapes))  # fmt: skip


def test_dora_and_gaussian_init_attach_and_round_trip():
    plain = lora.attach_lora(testmodels.build_tiny(0).unet, TINY_LORA)
    unet = testmodels.build_tiny(0).unet
    dora = lora.attach_lora(unet, LoraConfig(rank=4, alpha=4, dora=True, init="gaussian"))
    assert dora > plain  # the magnitude vectors are trained too
    state = lora.lora_state_dict(unet)
    assert any("magnitude" in k for k in state)
    other = testmodels.build_tiny(0).unet
    lora.attach_lora(other, LoraConfig(rank=4, alpha=4, dora=True, init="gaussian"))
    lora.load_lora_state_dict(other, state)
    assert all(torch.equal(v, state[k]) for k, v in lora.lora_state_dict(other).items())
