"""Experiments: [[variants]] tables load as whole profiles (bad ones refused naming the variant and the key),
the next variant is chosen in declared order, failures are recorded and retried only when nothing else is
left, the shared latent cache is keyed by what the cache holds, and compare's table reads the stored runs."""

from __future__ import annotations

import json
import struct

import pytest

from runner import experiment as exp
from runner.compare import RunResult, safetensors_params, table
from runner.errors import ProfileError
from runner.profile import fingerprint, load_profile
from runner.storage.local import LocalStorage

BASE = """
name = "exp"
[model]
base = "tiny"
[data]
source = "generated"
[lora]
rank = 4
alpha = 4
[train]
steps = 10
resolution = 64
lr = 1e-3
"""


def write(tmp_path, variants: str, base: str = BASE):
    path = tmp_path / "exp.toml"
    path.write_text(base + variants)
    return path


def test_variants_are_whole_profiles_with_their_overrides(tmp_path):
    path = write(tmp_path, """
[[variants]]
name = "plain"

[[variants]]
name = "rank8"
lora.rank = 8
lora.alpha = 8

[[variants]]
name = "dora-prodigy"
[variants.lora]
dora = true
[variants.train]
optimizer = "prodigy"
lr = 1.0
""")  # fmt: skip
    p = load_profile(str(path))
    assert [v.variant for v in p.variants] == ["plain", "rank8", "dora-prodigy"]
    assert [v.run_name for v in p.variants] == ["exp--plain", "exp--rank8", "exp--dora-prodigy"]
    plain, rank8, dora = p.variants
    assert (rank8.lora.rank, rank8.lora.alpha, rank8.lora.targets) == (8, 8.0, plain.lora.targets)
    assert dora.lora.dora and dora.train.optimizer == "prodigy" and dora.train.lr == 1.0
    assert dora.train.steps == plain.train.steps == 10  # the base's keys carry over
    assert len({fingerprint(v) for v in p.variants}) == 3  # each variant is its own run
    assert "variants" not in p.to_dict() and not plain.variants


def test_set_applies_to_every_variant(tmp_path):
    path = write(tmp_path, '[[variants]]\nname = "a"\n[[variants]]\nname = "b"\nlora.rank = 8\n')
    p = load_profile(str(path), ["train.steps=3"])
    assert [v.train.steps for v in p.variants] == [3, 3]
    assert [v.lora.rank for v in p.variants] == [4, 8]


@pytest.mark.parametrize(
    ("variants", "words"),
    [
        ('[[variants]]\nname = "drop"\nlora.droput = 0.5\n', ["variant 'drop'", "lora.droput", "unknown key"]),
        ('[[variants]]\nname = "drop"\nlora.dropout = 1.5\n', ["variant 'drop'", "lora.dropout", "out of range"]),
        ('[[variants]]\nname = "x"\ntrian.lr = 1e-4\n', ["variant 'x'", "trian", "unknown"]),
        ('[[variants]]\nname = "big-lr"\ntrain.lr = 2.0\n', ["variant 'big-lr'", "train.lr", "prodigy"]),
        ('[[variants]]\nname = "a b"\n', ["name"]),
        ("[[variants]]\nlora.rank = 8\n", ["variant #1", "name"]),
        ('[[variants]]\nname = "a"\n[[variants]]\nname = "a"\n', ["variant 'a'", "two variants"]),
        ('[[variants]]\nname = "a"\nrun = "other"\n', ["variant 'a'", "run"]),
        ("VARIANTS = 3", ["variants", "[[variants]]"]),
    ],
)
def test_a_bad_variant_is_refused_naming_the_variant_and_the_key(tmp_path, variants, words):
    path = (
        write(tmp_path, "", base="variants = 3\n" + BASE) if variants == "VARIANTS = 3" else write(tmp_path, variants)
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert info.value.exit_code == 2
    for word in words:
        assert word in str(info.value)
    assert str(path) in str(info.value)


def test_prodigy_takes_a_multiplier_other_optimizers_a_learning_rate(tmp_path):
    path = write(tmp_path, "")
    assert load_profile(str(path), ["train.optimizer=prodigy", "train.lr=1.0"]).train.lr == 1.0
    with pytest.raises(ProfileError, match="train.lr"):
        load_profile(str(path), ["train.lr=1.0"])


def test_next_variant_in_declared_order_failures_last():
    order = ["a", "b", "c"]
    assert exp.next_variant(order, set(), set(), set()) == "a"
    assert exp.next_variant(order, {"a"}, set(), set()) == "b"
    # b failed before: skipped while c is left, tried again once nothing else is
    assert exp.next_variant(order, {"a"}, {"b"}, set()) == "c"
    assert exp.next_variant(order, {"a", "c"}, {"b"}, set()) == "b"
    assert exp.next_variant(order, {"a", "c"}, {"b"}, {"b"}) is None  # once per command
    assert exp.next_variant(order, {"a", "b", "c"}, set(), set()) is None


def test_the_record_keeps_failures_of_declared_variants(tmp_path):
    storage = LocalStorage(tmp_path)
    record = exp.open_record(storage, "exp", [("a", "exp--a"), ("b", "exp--b")])
    record = exp.record_failure(storage, record, "b", "lora.rank: bad")
    again = exp.open_record(storage, "exp", [("a", "exp--a"), ("b", "exp--b")])
    assert again.failed == {"b": "lora.rank: bad"}
    assert exp.open_record(storage, "exp", [("a", "exp--a")]).failed == {}  # b no longer declared
    assert exp.list_experiments(storage) == ["exp"]
    assert not exp.is_complete(storage, "exp--a")


def test_variants_of_one_data_set_share_one_cache_key(tmp_path):
    from runner.train.cache import cache_fingerprint

    path = write(tmp_path, """
[[variants]]
name = "unet"
[[variants]]
name = "te"
lora.text_encoder = true
[[variants]]
name = "many"
lora.targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
lora.dropout = 0.5
[[variants]]
name = "hires"
train.resolution = 128
""")  # fmt: skip
    keys = [cache_fingerprint(exp.shared_cache_profile(v)) for v in load_profile(str(path)).variants]
    assert keys[0] == keys[1] == keys[2] != keys[3]  # another resolution needs other latents


def _safetensors(path, shapes: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_compare_table_counts_parameters_and_marks_failures(tmp_path):
    _safetensors(tmp_path / "l.safetensors", {"a": [4, 16], "b": [16, 4], "c": [3]})
    assert safetensors_params(tmp_path / "l.safetensors") == 131
    rows = [
        RunResult("plain", "exp--plain", 10, 10, 0.5, 2, 131, 3 * 2**20, 0.123456),
        RunResult("drop", "exp--drop", 4, 10, 0.2, 1),
        RunResult("bad", "exp--bad", failed="lora.rank: -1 is out of range"),
    ]
    text = table(rows)
    assert "| plain | 10 / 10 | 0.50 | 2 | 131 | 3.0 MiB | 0.12346 |" in text
    assert "| drop | 4 / 10 (training) |" in text
    assert "failed: lora.rank: -1 is out of range" in text


def test_the_dashboard_line_names_the_variant():
    from runner.dashview import plain_line
    from runner.snapshot import Snapshot

    assert plain_line(Snapshot(run="exp--dora", step=3, target=10), 0.0).startswith("relay | variant dora | step 3/10")
    assert plain_line(Snapshot(run="tiny", step=3, target=10), 0.0).startswith("relay | step 3/10")


def test_the_shipped_experiment_reproduces_the_six_naruto_variants(tmp_path, capsys):
    """Text encoders with and without LoRA (8-bit frozen), attention only or many layers, DoRA with Prodigy,
    LoRA dropout 0.5; `relay plan` gives each variant's and the whole set's T4 hours."""
    from runner.cli import main

    p = load_profile("sdxl-naruto-experiment")
    v = {x.variant: x for x in p.variants}
    assert list(v) == ["te-many-layers", "te-attention", "many-layers", "attention", "dora-prodigy", "dropout-0.5"]
    assert [x.lora.text_encoder for x in p.variants] == [True, True, False, False, False, False]
    assert v["te-many-layers"].lora.text_encoder_8bit and v["te-attention"].lora.text_encoder_8bit
    assert "conv1" in v["many-layers"].lora.targets and "conv1" not in v["attention"].lora.targets
    assert v["dora-prodigy"].lora.dora and v["dora-prodigy"].train.optimizer == "prodigy"
    assert v["dropout-0.5"].lora.dropout == 0.5
    assert len({x.run_name for x in p.variants}) == 6
    args = ["plan", "--profile", "sdxl-naruto-experiment", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path)]
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "experiment: 6 variants" in out and "whole set: about" in out and "on one T4" in out


def test_relay_train_refuses_a_bad_variant_before_anything_starts(tmp_path, capsys):
    from runner.cli import main

    path = write(tmp_path, '[[variants]]\nname = "ok"\n[[variants]]\nname = "dora"\nlora.dora = "yes"\n')
    code = main(["train", "--profile", str(path), "--storage", str(tmp_path / "store"), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "variant 'dora'" in err and "lora.dora" in err and "true or false" in err
    assert not (tmp_path / "store").exists()  # nothing trained, not even the valid variant
