"""Exact resume with the text encoders trained too (issue 17): the tiny profile on CPU with
lora.text_encoder = true, stopped by SIGTERM after step 2 and resumed, ends with a final LoRA, the
encoders' weights included, bit-identical to one uninterrupted session's. Turning the text encoders on
or off for a stored run is refused, naming the field."""

from __future__ import annotations

import shutil

import pytest
import torch

from runner.context import Options, build_context
from runner.errors import EXIT_OK, EXIT_PREEMPTED, ResumeMismatch
from runner.runinfo import ensure_run_info

from .test_resume import FAST, FINAL_LORA, RUN, assert_same_lora, committed_steps, read_lora, run_session

TE = ("lora.text_encoder=true", "lora.text_encoder_lr=5e-3", "data.caption_dropout=0.3")


@pytest.fixture
def te_reference(tmp_path_factory):
    storage = tmp_path_factory.getbasetemp() / "relay-te-reference" / "storage"
    if not (storage / RUN / FINAL_LORA).exists():
        shutil.rmtree(storage.parent, ignore_errors=True)
        result = run_session(storage, storage.parent / "work", *TE)
        assert result.code == EXIT_OK, result.warnings()
    return storage


def test_sigterm_then_resume_with_text_encoders_gives_the_uninterrupted_lora(te_reference, tmp_path):
    storage, work = tmp_path / "storage", tmp_path / "work"
    first = run_session(storage, work, *TE, stop_after=2)
    assert first.code == EXIT_PREEMPTED and 2 in committed_steps(storage)
    checkpoint = read_lora(storage / RUN / "checkpoints" / "step-00000002" / "lora.safetensors")
    te_b = [v for k, v in checkpoint.items() if k.startswith("text_encoder") and "lora_B" in k]
    assert te_b and any(torch.count_nonzero(v) for v in te_b), "the checkpoint must carry the trained encoders"

    second = run_session(storage, work, *TE)
    assert second.code == EXIT_OK
    assert_same_lora(storage / RUN / FINAL_LORA, te_reference / RUN / FINAL_LORA)
    final = read_lora(storage / RUN / FINAL_LORA)
    assert any(k.startswith("text_encoder_2.text_model.") for k in final)
    assert (storage / RUN / "final" / "samples.png").is_file()


@pytest.mark.parametrize(("before", "after"), [((), TE[:1]), (TE[:1], ())])
def test_turning_the_text_encoders_on_or_off_for_a_stored_run_is_refused(tmp_path, before, after):
    def context(*extra: str):
        return build_context(Options(profile="tiny", storage=str(tmp_path / "s"), overrides=FAST + extra,
                                     workdir=str(tmp_path / "w")))  # fmt: skip

    ensure_run_info(context(*before), force=False)
    with pytest.raises(ResumeMismatch) as refused:
        ensure_run_info(context(*after), force=False)
    assert "lora.text_encoder" in refused.value.fields
