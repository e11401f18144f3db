"""Sample grids: base | LoRA per prompt, from one pipeline, leaving the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from PIL import Image

from runner.errors import ModelError, UsageError
from runner.profile import LoraConfig
from runner.sample import ensure_writable, has_adapter, sample_grid
from runner.samplegrid import HEADERS, LABEL_H_PX, PROMPT_W_PX, make_grid
from runner.train.lora import attach_lora, lora_state_dict
from runner.train.testmodels import build_tiny

LORA = LoraConfig(rank=4, alpha=8.0)
PROMPTS = ["a red circle", "a blue square"]


def randomised_lora(seed: int = 1) -> dict[str, torch.Tensor]:
    parts = build_tiny(seed=0)
    attach_lora(parts.unet, LORA)
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.3 if "lora_B" in k else v) for k, v in lora_state_dict(parts.unet).items()}  # fmt: skip


def halves(path, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)[LABEL_H_PX:, PROMPT_W_PX:]
    h, w = grid.shape[0] // rows, grid.shape[1] // 2
    return [(grid[r * h : (r + 1) * h, :w], grid[r * h : (r + 1) * h, w:]) for r in range(rows)]


def test_grid_has_a_row_per_prompt_and_the_lora_column_differs(tmp_path):
    parts = build_tiny(seed=0)
    out = sample_grid(parts, randomised_lora(), PROMPTS, seed=3, steps=2, guidance=5.0, resolution=64,
                      out_path=tmp_path / "grid.png", lora_cfg=LORA)  # fmt: skip
    assert Image.open(out).size == (PROMPT_W_PX + 2 * 64, LABEL_H_PX + 2 * 64)
    for base, tuned in halves(out, rows=2):
        assert np.abs(base - tuned).max() > 10, "the LoRA column looks like the base column"
    assert not has_adapter(parts.unet), "the adapter attached for sampling must be removed"


def test_base_column_is_the_untouched_model_and_the_training_adapter_is_kept(tmp_path):
    # during training the UNet already carries the adapter: lora_sd=None samples it as it is
    trained = build_tiny(seed=0)
    attach_lora(trained.unet, LORA)
    set_peft_model_state_dict(trained.unet, randomised_lora())
    before = lora_state_dict(trained.unet)
    with_lora = sample_grid(trained, None, PROMPTS[:1], seed=3, steps=2, guidance=5.0, resolution=64,
                            out_path=tmp_path / "a.png")  # fmt: skip
    plain = sample_grid(build_tiny(seed=0), randomised_lora(seed=99), PROMPTS[:1], seed=3, steps=2, guidance=5.0,
                        resolution=64, out_path=tmp_path / "b.png", lora_cfg=LORA)  # fmt: skip
    (base_a, tuned_a), (base_b, _) = halves(with_lora, 1)[0], halves(plain, 1)[0]
    np.testing.assert_array_equal(base_a, base_b)  # adapter off = the base model, whatever the LoRA
    assert np.abs(base_a - tuned_a).max() > 10
    after = lora_state_dict(trained.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for n, p in trained.unet.named_parameters() if "lora_" in n), "LoRA must stay trainable"


def test_mixed_precision_parts_sample_and_keep_their_dtypes(tmp_path):
    # as during training on a GPU: half-precision UNet, fp32 text encoders, fp16 VAE that must decode in fp32
    parts = build_tiny(seed=0)
    parts.unet.to(torch.bfloat16)
    parts.vae.to(torch.float16)
    attach_lora(parts.unet, LORA)
    out = sample_grid(
        parts, None, PROMPTS[:1], seed=3, steps=1, guidance=5.0, resolution=64, out_path=tmp_path / "m.png"
    )
    assert Image.open(out).size == (PROMPT_W_PX + 128, LABEL_H_PX + 64)
    assert parts.vae.dtype == torch.float16 and parts.text_encoder.dtype == torch.float32
    assert not parts.vae.use_tiling, "tiling left on would change the latents of a later cache build"
    assert next(p for n, p in parts.unet.named_parameters() if "lora_A" not in n).dtype == torch.bfloat16


def test_sampling_without_any_lora_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no LoRA"):
        sample_grid(build_tiny(seed=0), None, PROMPTS, 0, 1, 1.0, 64, tmp_path / "x.png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_sampling_mid_training_on_cuda_puts_everything_back(tmp_path, cpu_offload):
    # the training layout: fp16 UNet + fp32 LoRA on the GPU, text encoders and VAE (fp32) parked on the CPU
    parts = build_tiny(seed=0)
    parts.unet.to("cuda", torch.float16)
    attach_lora(parts.unet, LORA)
    set_peft_model_state_dict(parts.unet, randomised_lora())
    before = {k: v.clone() for k, v in lora_state_dict(parts.unet).items()}
    out = sample_grid(parts, None, PROMPTS, seed=3, steps=2, guidance=5.0, resolution=64,
                      out_path=tmp_path / "g.png", device="cuda", cpu_offload=cpu_offload)  # fmt: skip
    after = lora_state_dict(parts.unet)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
    assert all(p.requires_grad for n, p in parts.unet.named_parameters() if "lora_" in n), "LoRA must stay trainable"
    for base, tuned in halves(out, rows=2):
        assert np.abs(base - tuned).max() > 10
    assert parts.unet.device.type == "cuda" and parts.unet.dtype == torch.float16
    for module in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        assert next(module.parameters()).device.type == "cpu" and module.dtype == torch.float32
    assert not hasattr(parts.unet, "_hf_hook") or parts.unet._hf_hook is None, "offload hooks left behind"


def ink(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels (text) in `box` of a white-background label region."""
    return int((np.asarray(image.convert("L").crop(box)) < 128).sum())


def test_grid_labels_rows_with_their_prompt_and_columns_with_base_and_lora_at_the_step():
    cells = [[Image.new("RGB", (64, 64), "gray") for _ in range(2)] for _ in range(3)]
    prompts = ["a red circle", "", "a very long prompt " * 20]
    grid = make_grid(cells, HEADERS, prompts, step=120)
    assert grid.size == (PROMPT_W_PX + 2 * 64, LABEL_H_PX + 3 * 64)
    assert ink(grid, (PROMPT_W_PX, 0, PROMPT_W_PX + 64, LABEL_H_PX)) > 0, "no 'base' header"
    assert ink(grid, (PROMPT_W_PX + 64, 0, PROMPT_W_PX + 128, LABEL_H_PX)) > 0, "no 'LoRA' header"
    rows = [ink(grid, (0, LABEL_H_PX + r * 64, PROMPT_W_PX, LABEL_H_PX + (r + 1) * 64)) for r in range(3)]
    assert rows[0] > 0 and rows[1] == 0 and rows[2] > rows[0], f"prompt labels per row: {rows}"
    below = ink(grid, (0, LABEL_H_PX + 3 * 64 - 2, PROMPT_W_PX, LABEL_H_PX + 3 * 64))
    assert below == 0, "a long prompt must be cut to its row, not run into the next"
    np.testing.assert_array_equal(np.asarray(grid)[LABEL_H_PX:, PROMPT_W_PX:], 128)  # images untouched


def test_an_output_path_that_cannot_be_written_is_bad_input(tmp_path):
    with pytest.raises(UsageError, match="--out /proc/relay-x/grid.png: cannot write there") as bad:
        ensure_writable(tmp_path.parent / "/proc/relay-x/grid.png")
    assert bad.value.exit_code == 2
    assert ensure_writable(tmp_path / "new" / "grid.png").parent.is_dir()


def test_the_step_is_named_in_the_lora_header_or_in_the_corner_when_the_column_is_narrow():
    wide = make_grid([[Image.new("RGB", (256, 32), "gray")] * 2], HEADERS, ["p"], step=120)
    narrow = make_grid([[Image.new("RGB", (32, 32), "gray")] * 2], HEADERS, ["p"], step=120)
    plain = make_grid([[Image.new("RGB", (256, 32), "gray")] * 2], HEADERS, ["p"])
    lora_header = (PROMPT_W_PX + 256, 0, PROMPT_W_PX + 512, LABEL_H_PX)
    assert ink(wide, lora_header) > ink(plain, lora_header), "'· step 120' missing from the LoRA header"
    corner = (0, 0, PROMPT_W_PX, LABEL_H_PX)
    assert ink(narrow, corner) > ink(plain, corner), "the step of a narrow grid is not in the corner"


def test_a_lora_that_trained_the_text_encoders_samples_with_them_and_leaves_them_base(tmp_path):
    from runner.train.lora import TextEncoders, attach_text_encoder_lora, has_lora

    cfg = LoraConfig(rank=4, alpha=8.0, text_encoder=True)
    source = build_tiny(seed=0)
    attach_lora(source.unet, cfg)
    encoders = TextEncoders(source.text_encoder, source.text_encoder_2)
    attach_text_encoder_lora(encoders, cfg)
    unet_only = randomised_lora()
    gen = torch.Generator().manual_seed(5)
    full = {k: (torch.randn(v.shape, generator=gen) if "lora_B" in k else v)
            for k, v in lora_state_dict(source.unet, encoders).items() if k.startswith("text_encoder")}  # fmt: skip
    full.update(unet_only)
    parts = build_tiny(seed=0)
    with_te = sample_grid(parts, full, PROMPTS[:1], seed=3, steps=2, guidance=5.0, resolution=64,
                          out_path=tmp_path / "te.png", lora_cfg=cfg)  # fmt: skip
    without = sample_grid(parts, unet_only, PROMPTS[:1], seed=3, steps=2, guidance=5.0, resolution=64,
                          out_path=tmp_path / "unet.png", lora_cfg=LORA)  # fmt: skip
    (base_te, tuned_te), (base, tuned) = halves(with_te, 1)[0], halves(without, 1)[0]
    np.testing.assert_array_equal(base_te, base)  # the base column encodes with the base encoders
    assert np.abs(tuned_te - tuned).max() > 10, "the LoRA column did not use the trained text encoders"
    assert not has_lora(parts.text_encoder) and not has_lora(parts.text_encoder_2)


def test_sampling_another_lora_on_a_model_with_an_adapter_restores_its_weights(tmp_path):
    parts = build_tiny(seed=0)
    attach_lora(parts.unet, LORA)
    set_peft_model_state_dict(parts.unet, randomised_lora(seed=4))
    before = {k: v.clone() for k, v in lora_state_dict(parts.unet).items()}  # CPU state dicts share memory
    sample_grid(parts, randomised_lora(seed=5), PROMPTS[:1], seed=3, steps=1, guidance=5.0, resolution=64,
                out_path=tmp_path / "x.png", lora_cfg=LORA)  # fmt: skip
    after = lora_state_dict(parts.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
