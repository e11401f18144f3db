"""Profiles: every shipped profile loads, overrides are typed, bad input names the file and the key."""

from __future__ import annotations

import pytest

from runner.errors import ProfileError
from runner.profile import (
    diff_fields,
    fingerprint,
    fingerprint_fields,
    list_profiles,
    load_profile,
)

SHIPPED = ["sdxl-naruto-t4", "sdxl-naruto-t4-512", "sdxl-naruto-kaggle-2xt4", "sdxl-naruto-t4-te", "tiny"]


def test_shipped_profiles_load_and_have_descriptions():
    listed = dict(list_profiles())
    assert set(SHIPPED) <= set(listed)
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name
        assert listed[name]


def test_reference_profile_matches_the_reference_job():
    p = load_profile("sdxl-naruto-t4")
    assert p.model.base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert p.data.source == "lambdalabs/naruto-blip-captions"
    assert (p.train.resolution, p.lora.rank, p.lora.alpha) == (1024, 16, 32)
    assert p.lora.targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert p.train.batch_size * p.train.grad_accum == 4
    assert p.train.steps == 2000 and p.train.gradient_checkpointing == "auto"
    assert load_profile("sdxl-naruto-t4-512").train.resolution == 512


def test_the_naruto_profiles_of_one_job_are_one_run():
    """Issue 14, item 4: a session on one T4 and one on Kaggle's 2×T4 continue the same run (same name,
    same fingerprint, same effective batch); the 512 px profile is another job, so another run."""
    t4, kaggle, small = (load_profile(n) for n in ("sdxl-naruto-t4", "sdxl-naruto-kaggle-2xt4", "sdxl-naruto-t4-512"))
    assert t4.run_name == kaggle.run_name == "sdxl-naruto"
    assert fingerprint_fields(t4) == fingerprint_fields(kaggle) and fingerprint(t4) == fingerprint(kaggle)
    assert fingerprint_fields(t4)["train.effective_batch"] == 4
    assert small.run_name == "sdxl-naruto-t4-512" and fingerprint(small) != fingerprint(t4)


def test_the_run_name_defaults_to_the_profile_name_and_is_no_weight_setting():
    tiny = load_profile("tiny")
    assert tiny.run == "" and tiny.run_name == "tiny"
    named = load_profile("tiny", ["run=shared"])
    assert named.run_name == "shared" and fingerprint(named) == fingerprint(tiny)


def test_overrides_are_typed():
    p = load_profile("tiny", ["train.lr=2e-4", "lora.rank=8", "data.flip=false", 'lora.targets=["to_q"]'])
    assert p.train.lr == pytest.approx(2e-4) and isinstance(p.train.lr, float)
    assert p.lora.rank == 8 and p.data.flip is False and p.lora.targets == ("to_q",)
    assert load_profile("tiny", ["train.gradient_checkpointing=true"]).train.gradient_checkpointing == "on"
    assert load_profile("tiny", ["model.base=some/model"]).model.base == "some/model"


def test_profile_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "mine"\n[train]\nsteps = 10\nresolution = 64\n')
    p = load_profile(str(path))
    assert p.name == "mine" and p.train.steps == 10 and p.source_path == str(path)


def test_fingerprint_covers_weights_not_logistics():
    base = load_profile("tiny")
    same = [
        "checkpoint.every_min=5",
        "checkpoint.keep=9",
        "session.hours=2",
        "dashboard.plain_every_s=5",
        "sample.every_steps=10",
        'train.gradient_checkpointing="on"',
        'train.compile="graphs"',  # a resumed session may compile differently (another GPU, no Triton)
    ]
    for item in same:
        assert fingerprint(load_profile("tiny", [item])) == fingerprint(base), item
    # the fit may split the same effective batch differently on another GPU
    assert fingerprint(load_profile("tiny", ["train.batch_size=1", "train.grad_accum=4"])) == fingerprint(base)
    different = [
        "train.lr=0.05",
        "lora.rank=8",
        "data.flip=false",
        "train.resolution=128",
        "train.seed=1",
        'model.base="x/y"',
        "train.grad_accum=3",
        "lora.dropout=0.1",
        'data.source="/data"',
    ]
    for item in different:
        assert fingerprint(load_profile("tiny", [item])) != fingerprint(base), item


def test_diff_names_the_fields():
    a = fingerprint_fields(load_profile("tiny"))
    b = fingerprint_fields(load_profile("tiny", ["lora.rank=8", "train.lr=0.05"]))
    assert set(diff_fields(a, b)) == {"lora.rank", "train.lr"}
    assert diff_fields(a, b)["lora.rank"] == (4, 8)


BAD_TOML = [
    # (profile text, key the error must name, a word the message must contain)
    ("[train]\nsteps = 0\n", "train.steps", "out of range"),
    ("[train]\nsteps = -5\n", "train.steps", "out of range"),
    ('[train]\nsteps = "many"\n', "train.steps", "integer"),
    ("[train]\nsteps = 1.5\n", "train.steps", "integer"),
    ("[train]\nresolution = 1004\n", "train.resolution", "multiple of 8"),
    ("[train]\nresolution = 1020\n", "train.resolution", "multiple of 8"),
    ("[train]\nresolution = 16\n", "train.resolution", "out of range"),
    ("[train]\nlr = 0\n", "train.lr", "out of range"),
    ("[train]\nlr = -1e-4\n", "train.lr", "out of range"),
    ("[train]\nlr = 3\n", "train.lr", "out of range"),
    ('[train]\nlr = "fast"\n', "train.lr", "number"),
    ("[train]\nbatch_size = 0\n", "train.batch_size", "out of range"),
    ("[train]\ngrad_accum = 0\n", "train.grad_accum", "out of range"),
    ('[train]\nprecision = "fp8"\n', "train.precision", "fp16"),
    ('[train]\noptimizer = "sgd"\n', "train.optimizer", "adamw8bit"),
    ('[train]\ngradient_checkpointing = "maybe"\n', "train.gradient_checkpointing", "auto"),
    ('[train]\nlr_scheduler = "exp"\n', "train.lr_scheduler", "cosine"),
    ('[train]\nprediction_type = "x0"\n', "train.prediction_type", "epsilon"),
    ("[train]\nsnr_gamma = -1\n", "train.snr_gamma", "out of range"),
    ("[train]\nwarmup_steps = 5000\n", "train.warmup_steps", "shorter"),
    ("[train]\nstep = 100\n", "train.step", "unknown key"),
    ("[train]\nlearning_rate = 1e-4\n", "train.learning_rate", "unknown key"),
    ("[lora]\nrank = 0\n", "lora.rank", "out of range"),
    ("[lora]\nrank = -16\n", "lora.rank", "out of range"),
    ('[lora]\nrank = "16"\n', "lora.rank", "integer"),
    ("[lora]\nalpha = 0\n", "lora.alpha", "out of range"),
    ("[lora]\ndropout = 1.0\n", "lora.dropout", "out of range"),
    ("[lora]\ntargets = []\n", "lora.targets", "out of range"),
    ('[lora]\ntargets = "to_q"\n', "lora.targets", "list of strings"),
    ("[lora]\ntargets = [1, 2]\n", "lora.targets", "list of strings"),
    ('[lora]\ndora = "yes"\n', "lora.dora", "true or false"),
    ('[lora]\ninit = "pissa"\n', "lora.init", "gaussian"),
    ('[lora]\ntargets = ["to_q", "attn1"]\n', "lora.targets", "conv_shortcut"),
    ('[lora]\ntext_encoder = "yes"\n', "lora.text_encoder", "true or false"),
    ("[lora]\ntext_encoder_lr = 2\n", "lora.text_encoder_lr", "out of range"),
    ("[lora]\ntext_encoder_rank = -1\n", "lora.text_encoder_rank", "out of range"),
    ("[lora]\ntext_encoder_alpha = -1\n", "lora.text_encoder_alpha", "out of range"),
    ('[lora]\ntext_encoder_targets = ["to_q"]\n', "lora.text_encoder_targets", "fc1"),
    ("[lora]\ntext_encoder_targets = []\n", "lora.text_encoder_targets", "out of range"),
    ("[lora]\ntext_encoder_8bit = true\n", "lora.text_encoder_8bit", "lora.text_encoder = true"),
    ("[data]\ncaption_dropout = 1.5\n", "data.caption_dropout", "out of range"),
    ("[data]\nrandom_crop = true\n", "data.random_crop", "cached latents"),
    ("[data]\nflip = 1\n", "data.flip", "true or false"),
    ('[data]\nimage_col = "img"\n', "data.image_col", "unknown key"),
    ("[checkpoint]\nkeep = 0\n", "checkpoint.keep", "out of range"),
    ("[checkpoint]\nevery_min = 0\n", "checkpoint.every_min", "out of range"),
    ("[session]\nhours = 100\n", "session.hours", "out of range"),
    ("[sesion]\nhours = 1\n", "sesion", "unknown"),
    ("train = 5\n", "train", "table"),
    ("[model]\nbase = 42\n", "model.base", "string"),
    ('colour = "red"\n', "colour", "unknown"),
]


@pytest.mark.parametrize(
    ("text", "key", "word"), BAD_TOML, ids=[b[1] + ":" + b[0].split("\n")[1][:20] for b in BAD_TOML]
)
def test_bad_profile_names_file_and_key(tmp_path, text, key, word):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message, message
    assert key in message, message
    assert word in message, message
    assert info.value.exit_code == 2


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = 1\n")
    with pytest.raises(ProfileError, match="not valid TOML") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_missing_profile_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ProfileError, match="no profile named 'nope'") as info:
        load_profile("nope")
    assert "tiny" in str(info.value)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    ("item", "word"),
    [
        ("train.lr", "section.key=value"),
        ("=3", "section.key=value"),
        ("a.b.c=1", "section.key"),
        ("train.lr=abc", "number"),
        ("lora.rank=2.5", "integer"),
        ("train.nope=1", "unknown key"),
    ],
)
def test_bad_overrides(item, word):
    with pytest.raises(ProfileError, match=word):
        load_profile("tiny", [item])


def test_text_encoder_settings_default_to_the_unets():
    p = load_profile("tiny", ["lora.text_encoder=true"])
    assert (p.lora.text_encoder_lr, p.lora.text_encoder_rank, p.lora.text_encoder_alpha) == (p.train.lr, 4, 4.0)
    assert p.lora.text_encoder_targets == ("q_proj", "k_proj", "v_proj", "out_proj")
    own = load_profile("tiny", ["lora.text_encoder=true", "lora.text_encoder_lr=5e-5", "lora.text_encoder_rank=8",
                                'lora.text_encoder_targets=["q_proj", "fc1", "fc2"]'])  # fmt: skip
    assert (own.lora.text_encoder_lr, own.lora.text_encoder_rank) == (5e-5, 8)
    assert load_profile("sdxl-naruto-t4-te").lora.text_encoder is True


def test_fingerprint_covers_the_text_encoder_keys_only_when_they_train():
    off = fingerprint_fields(load_profile("tiny"))
    assert not any(k.startswith("lora.text_encoder_") for k in off)  # older runs keep their fingerprint
    assert fingerprint(load_profile("tiny", ["lora.text_encoder_lr=5e-5"])) == fingerprint(load_profile("tiny"))
    on = fingerprint_fields(load_profile("tiny", ["lora.text_encoder=true"]))
    assert "lora.text_encoder" in diff_fields(off, on)  # a resume that turns it on is refused, naming it
    base = load_profile("tiny", ["lora.text_encoder=true"])
    for item in ["lora.text_encoder_lr=5e-5", "lora.text_encoder_rank=8", "lora.text_encoder_alpha=1",
                 'lora.text_encoder_targets=["q_proj"]']:  # fmt: skip
        changed = fingerprint_fields(load_profile("tiny", ["lora.text_encoder=true", item]))
        assert set(diff_fields(fingerprint_fields(base), changed)) == {item.split("=")[0]}, item


def test_lora_targets_beyond_attention_are_accepted():
    targets = (
        '["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", '
        '"ff.net.0.proj", "ff.net.2", "time_emb_proj"]'
    )
    assert "conv_shortcut" in load_profile("tiny", [f"lora.targets={targets}"]).lora.targets
    assert load_profile("tiny", ['lora.targets=["attn2.to_k", "attn2.to_v"]']).lora.targets == (
        "attn2.to_k",
        "attn2.to_v",
    )
