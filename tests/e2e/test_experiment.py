"""Experiments end to end, on the CPU: a three-variant tiny experiment trained hands-off through several
short sessions (each on a fresh work folder, as a new Colab VM is; each stopped by SIGTERM after a known
number of steps, one of them right at the end of a variant), then compared.

Each variant's final LoRA must equal, bit for bit, a solo run of the same settings; the latent cache is built
once for the three; a stop that lands as a variant completes ends the command (75) before the next variant
starts; `relay status` names the variants and `relay compare` writes the table, the loss plot and the grid.
A variant that fails with bad input is recorded and skipped, the others still train, and the command ends
with exit 2 naming it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from runner import events
from runner.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from runner.session import TEST_STEP_DELAY_ENV as STEP_DELAY
from tests.e2e.conftest import assert_same_lora, relay_env, relay_main, start_relay, wait_for, wait_relay

BASE = """
name = "tiny-exp"
description = "three variants of the tiny job"
[model]
base = "tiny"
[data]
source = "generated"
generated_count = 4
validation_count = 1
flip = true
[lora]
rank = 4
alpha = 4
[train]
steps = 4
resolution = 32
batch_size = 1
grad_accum = 1
lr = 1e-2
precision = "fp32"
gradient_checkpointing = "off"
[checkpoint]
every_min = 30                 # only the end-of-session checkpoints: which exist does not depend on speed
[sample]
prompts = ["a red circle, Naruto style"]
inference_steps = 1
"""
VARIANTS = {"plain": [], "rank8": ["lora.rank=8", "lora.alpha=8"], "dropout": ["lora.dropout=0.5"]}
EXPERIMENT = BASE + """
[[variants]]
name = "plain"

[[variants]]
name = "rank8"
lora.rank = 8
lora.alpha = 8

[[variants]]
name = "dropout"
lora.dropout = 0.5
"""  # fmt: skip
FINAL = "final/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def solo_loras(tmp_path_factory) -> dict[str, Path]:
    """Each variant's settings trained as a plain run of its own, uninterrupted: the LoRAs to match."""
    root = tmp_path_factory.mktemp("solo")
    solo = root / "solo.toml"
    solo.write_text(BASE)
    out = {}
    for variant, sets in VARIANTS.items():
        assert train(solo, root / f"store-{variant}", root / f"work-{variant}", *sets) == EXIT_OK
        out[variant] = root / f"store-{variant}" / "tiny-exp" / FINAL
    return out


def stop_after_steps(steps: int | None):
    """How `relay train` builds its sessions' contexts so that a SIGTERM (as the platform sends it) comes right
    after the command's `steps`-th optimizer step, whichever variant it belongs to; None: no stop."""
    from runner.context import build_context as real

    count = [0]

    def build_context(*args, **kwargs):
        ctx = real(*args, **kwargs)

        def on_event(event) -> None:
            if steps is not None and isinstance(event, events.StepDone):
                count[0] += 1
                if count[0] == steps:
                    os.kill(os.getpid(), signal.SIGTERM)

        ctx.bus.subscribe(on_event)
        return ctx

    return build_context


def count_cache_pieces(monkeypatch) -> list[int]:
    from runner.train.cache import PieceBuilder

    built, real = [], PieceBuilder.__call__

    def call(self, start, stop, folder):
        built.append(start)
        return real(self, start, stop, folder)

    monkeypatch.setattr(PieceBuilder, "__call__", call)
    return built


def train(profile: Path, storage: Path, workdir: Path, *sets: str, contexts=None) -> int:
    args = ["train", "--profile", str(profile), "--storage", str(storage), "--workdir", str(workdir), "--plain"]
    for item in sets:
        args += ["--set", item]
    return relay_main(args, contexts=contexts)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_an_experiment_trains_hands_off_and_each_variant_equals_its_solo_run(tmp_path, monkeypatch, capsys,
                                                                             solo_loras):  # fmt: skip
    profile = tmp_path / "tiny-exp.toml"
    profile.write_text(EXPERIMENT)
    storage = tmp_path / "storage"
    built = count_cache_pieces(monkeypatch)

    codes = []
    # 4 steps a variant: the 1st stop lands on plain's last step; then rank8 3 + 1, dropout 2 + 2.
    for n, stop in enumerate((4, 3, 3, None)):
        stopping = stop_after_steps(stop)
        codes.append(train(profile, storage, tmp_path / f"vm-{n}", contexts=stopping))  # a fresh work folder: a new VM
        if n == 0:  # a stop as a variant completes ends the command before the next one starts
            assert (storage / "tiny-exp--plain" / "final" / "COMMIT.json").exists()
            assert not (storage / "tiny-exp--rank8").exists()
            assert not as_one(storage).complete  # what the Kaggle chain reads: keep going
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED, EXIT_PREEMPTED, EXIT_OK]
    whole = as_one(storage)
    assert whole.complete and (whole.step, whole.target, len(whole.sessions)) == (12, 12, 5)
    assert built == [0], "the latent cache must be built once, for every variant and session"
    assert sorted(p.parent.name for p in storage.glob("*/cache")) == ["tiny-exp"]
    assert json.loads((storage / "tiny-exp" / "experiment.json").read_text())["failed"] == {}
    sessions = {v: (storage / f"tiny-exp--{v}" / "sessions.jsonl").read_text().count("\n") for v in VARIANTS}
    assert sessions == {"plain": 1, "rank8": 2, "dropout": 2}

    for variant in VARIANTS:
        assert_same_lora(storage / f"tiny-exp--{variant}" / FINAL, solo_loras[variant])

    capsys.readouterr()
    assert relay_main(["status", "--storage", str(storage)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "3 of 3 variants complete" in out
    for variant in VARIANTS:
        assert f"{variant}: step 4 / 4 — complete" in out

    assert relay_main(["compare", "--storage", str(storage), "--out", str(tmp_path / "cmp")]) == EXIT_OK
    table = (storage / "tiny-exp" / "compare" / "table.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} | 4 / 4 |" in table
    rank4, rank8 = (_params(table, v) for v in ("plain", "rank8"))
    assert rank8 == 2 * rank4
    from PIL import Image

    grid = Image.open(storage / "tiny-exp" / "compare" / "grid.png")
    assert grid.height > 4 * 32  # the base model's row and one row per variant
    assert Image.open(storage / "tiny-exp" / "compare" / "losses.png").size == (900, 460)


@pytest.mark.slow
@pytest.mark.exact_resume
def test_an_experiment_killed_in_a_variant_ends_bit_identical(tmp_path, solo_loras):
    """SIGKILL (no checkpoint, no lease release) while the second variant trains, then a new session on a
    fresh work folder: it takes the dead process's lease, resumes, and every variant equals its solo run."""
    profile = tmp_path / "tiny-exp.toml"
    profile.write_text(EXPERIMENT.replace("every_min = 30", "every_min = 0.001"))  # checkpoints change no weight
    storage = tmp_path / "storage"
    args = ["train", "--profile", str(profile), "--storage", str(storage), "--workdir", str(tmp_path / "vm-0"),
            "--plain"]  # fmt: skip
    proc = start_relay(args, tmp_path / "killed.log", env=relay_env({STEP_DELAY: "0.3"}))
    try:
        second = storage / "tiny-exp--rank8" / "checkpoints"
        assert wait_for(lambda: any(second.glob("*/COMMIT.json")) or proc.poll() is not None, 240)
        proc.send_signal(signal.SIGKILL)
    finally:
        wait_relay(proc, 60)
    assert not (storage / "tiny-exp--rank8" / "final").exists(), "killed too late: the variant had completed"
    assert train(profile, storage, tmp_path / "vm-1") == EXIT_OK
    for variant in VARIANTS:
        assert_same_lora(storage / f"tiny-exp--{variant}" / FINAL, solo_loras[variant])


def as_one(storage: Path):
    """The experiment as one run, as `relay status --run EXP` and the Kaggle chain read it."""
    from runner.report import read_status
    from runner.storage.local import LocalStorage

    return read_status(LocalStorage(storage), "tiny-exp")


def _params(table: str, variant: str) -> int:
    row = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
    return int(row.split("|")[5].strip().replace(",", ""))


@pytest.mark.slow
def test_a_variant_that_fails_with_bad_input_is_recorded_and_skipped(tmp_path, capsys):
    profile = tmp_path / "exp.toml"
    profile.write_text(BASE + '\n[[variants]]\nname = "eightbit"\ntrain.optimizer = "adamw8bit"\n'
                       '\n[[variants]]\nname = "plain"\n')  # fmt: skip
    storage = tmp_path / "storage"
    code = train(profile, storage, tmp_path / "work", "train.steps=2")
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "variant 'eightbit' failed" in err and "eightbit, which failed" in err
    assert (storage / "tiny-exp--plain" / FINAL).exists()  # the other variant still trained
    failed = json.loads((storage / "tiny-exp" / "experiment.json").read_text())["failed"]
    assert list(failed) == ["eightbit"] and "CUDA" in failed["eightbit"]
    assert relay_main(["compare", "--storage", str(storage), "--no-grid", "--out", str(tmp_path / "c")]) == EXIT_OK
    assert "| eightbit | failed: " in (storage / "tiny-exp" / "compare" / "table.md").read_text()


@pytest.mark.slow
def test_the_notebook_cell_trains_the_experiment_and_shows_the_comparison(tmp_path, monkeypatch, capsys):
    """The cell, unchanged (runner.notebook.run headless, the trainer detached): every variant trained, then
    the comparison printed and drawn."""
    from runner import notebook

    monkeypatch.setenv("RELAY_HOME", str(tmp_path / "relay-home"))
    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "tiny-exp.toml"
    profile.write_text(EXPERIMENT)
    storage = tmp_path / "storage"
    outcome = notebook.run(str(profile), str(storage), workdir=str(tmp_path / "work"), overrides=["train.steps=2"])
    out = capsys.readouterr().out
    assert outcome.exit_code == EXIT_OK
    for variant in VARIANTS:
        assert (storage / f"tiny-exp--{variant}" / FINAL).exists()
        assert f"| {variant} | 2 / 2 |" in out
        assert f"relay | variant {variant} | step 2/2" in out  # the dashboard names the variant
    assert {p.name for p in (storage / "tiny-exp" / "compare").iterdir()} == {"table.md", "losses.png", "grid.png"}


@pytest.mark.slow
def test_the_shipped_experiment_trains_all_six_variants_on_one_cache(tmp_path, monkeypatch):
    """profiles/sdxl-naruto-experiment.toml on the tiny model (RELAY_TEST_TINY_MODEL, tests only); the
    8-bit text encoders need CUDA, so here they stay in full precision."""
    monkeypatch.setenv("RELAY_TEST_TINY_MODEL", "2")
    built = count_cache_pieces(monkeypatch)
    storage = tmp_path / "storage"
    args = ["train", "--profile", "sdxl-naruto-experiment", "--storage", str(storage), "--workdir", str(tmp_path),
            "--plain", "--set", "lora.text_encoder_8bit=false"]  # fmt: skip
    assert relay_main(args) == EXIT_OK
    finals = sorted(p.parent.parent.name for p in storage.glob(f"*/{FINAL}"))
    assert len(finals) == 6 and all(name.startswith("sdxl-naruto-experiment--") for name in finals)
    assert built == [0]  # text-encoder variants and the others share one cache
