"""VRAM fit: the order plans are tried in, the back-off against a simulated memory cap,
the failure message, OOM recognition without torch, and the re-plan sentence."""

from __future__ import annotations

import pytest

from runner.errors import CheckpointCorrupt, OutOfMemory, ProfileError
from runner.fit import Plan, ProbeResult, candidate_plans, describe_replan, is_oom_error, plan_fit


def shapes(plans: list[Plan]) -> list[tuple[int, int, bool]]:
    return [(p.micro_batch, p.grad_accum, p.gradient_checkpointing) for p in plans]


def test_auto_tries_fastest_first_then_checkpointing_then_smaller_micro_batches():
    assert shapes(candidate_plans(4, 1, "auto")) == [(4, 1, False), (4, 1, True), (2, 2, True), (1, 4, True)]


def test_on_never_tries_without_checkpointing_and_off_never_turns_it_on():
    assert shapes(candidate_plans(4, 2, "on")) == [(4, 2, True), (2, 4, True), (1, 8, True)]
    assert shapes(candidate_plans(4, 2, "off")) == [(4, 2, False), (2, 4, False), (1, 8, False)]


@pytest.mark.parametrize("batch_size,grad_accum", [(1, 4), (3, 2), (6, 2), (5, 4), (8, 1), (4, 1)])
@pytest.mark.parametrize("world", [1, 2])
def test_every_candidate_keeps_the_runs_effective_batch_whatever_the_gpu_count(batch_size, grad_accum, world):
    plans = candidate_plans(batch_size, grad_accum, "auto", world_size=world)
    assert all(p.effective_batch == batch_size * grad_accum for p in plans)
    assert all(p.per_rank_batch * world == batch_size * grad_accum and p.world_size == world for p in plans)
    assert plans[0].micro_batch <= batch_size and plans[-1].micro_batch == 1
    micro = [p.micro_batch for p in plans[1:]]
    assert micro == sorted(micro, reverse=True) and len(set(micro)) == len(micro)  # strictly shrinking


def test_the_kaggle_and_t4_splits_of_one_effective_batch():
    """The Naruto job: effective batch 4 is 1 × 4 on one T4 and 1 × 2 on each of Kaggle's two."""
    assert shapes(candidate_plans(1, 4, "off", world_size=1)) == [(1, 4, False)]
    assert shapes(candidate_plans(1, 4, "off", world_size=2)) == [(1, 2, False)]
    assert shapes(candidate_plans(4, 1, "off", world_size=2)) == [(2, 1, False), (1, 2, False)]


def test_an_effective_batch_the_processes_cannot_share_is_refused_with_what_would_work():
    with pytest.raises(ProfileError, match="effective batch \\(3 = batch_size × grad_accum\\)") as info:
        candidate_plans(1, 3, "auto", world_size=2)
    assert "train.grad_accum" in str(info.value) and "1, 3 GPUs" in str(info.value)


def test_bad_checkpointing_value_names_the_profile_key():
    with pytest.raises(ProfileError, match="train.gradient_checkpointing"):
        candidate_plans(1, 4, "sometimes")


def memory_probe(cap_gib: float, calls: list[Plan]):
    """A fake GPU: the UNet takes 8 GiB, activations 3 GiB per example, a third of that with checkpointing."""

    def probe(plan: Plan) -> ProbeResult:
        calls.append(plan)
        peak = 8.0 + plan.micro_batch * (1.0 if plan.gradient_checkpointing else 3.0)
        if peak > cap_gib:
            return ProbeResult(fits=False, peak_gib=cap_gib, error="CUDA out of memory")
        return ProbeResult(fits=True, peak_gib=peak, step_s=1.0)

    return probe


@pytest.mark.parametrize(
    "cap_gib,expected",
    [(24.0, (4, 1, False)), (15.0, (4, 1, True)), (11.0, (2, 2, True)), (9.5, (1, 4, True))],
)
def test_backs_off_to_the_fastest_plan_under_the_cap(cap_gib, expected):
    calls: list[Plan] = []
    plan = plan_fit(candidate_plans(4, 1, "auto"), memory_probe(cap_gib, calls))
    assert shapes([plan]) == [expected]
    assert calls[-1] == plan and len(calls) == candidate_plans(4, 1, "auto").index(plan) + 1  # stops at the first fit


def test_no_fit_lists_what_was_tried_and_suggests_without_lowering_anything():
    calls: list[Plan] = []
    with pytest.raises(OutOfMemory) as err:
        plan_fit(candidate_plans(2, 2, "auto"), memory_probe(8.5, calls))
    text = str(err.value)
    assert len(calls) == 3  # (2, off), (2, on), (1, on)
    assert "micro-batch 2 × 2 accumulation, gradient checkpointing off: out of memory (peak 8.5 GiB)" in text
    assert "micro-batch 1 × 4 accumulation, gradient checkpointing on" in text
    assert "train.resolution=512" in text and "lora.rank" in text and "never lowers" in text


def test_no_fit_with_checkpointing_off_suggests_allowing_it():
    with pytest.raises(OutOfMemory, match="train.gradient_checkpointing=auto"):
        plan_fit(candidate_plans(1, 1, "off"), memory_probe(8.5, []))


class FakeTorchOOM(RuntimeError):
    pass


FakeTorchOOM.__name__ = "OutOfMemoryError"
FakeTorchOOM.__module__ = "torch.cuda"


def test_recognises_oom_errors_by_type_and_by_message():
    assert is_oom_error(FakeTorchOOM("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.75 GiB total)"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert not is_oom_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_oom_error(ValueError("out of memory"))
    assert not is_oom_error(MemoryError())  # host RAM, not the GPU


def test_real_torch_oom_error_is_recognised():
    torch = pytest.importorskip("torch")
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory."))


def test_a_probe_that_raises_oom_backs_off_and_other_errors_propagate():
    def probe(plan: Plan) -> ProbeResult:
        if not plan.gradient_checkpointing:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return ProbeResult(fits=True)

    assert plan_fit(candidate_plans(1, 4), probe).gradient_checkpointing

    def broken(plan: Plan) -> ProbeResult:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    with pytest.raises(RuntimeError, match="cuDNN"):
        plan_fit(candidate_plans(1, 4), broken)


def test_plan_round_trips_and_rejects_garbage():
    plan = Plan(2, 2, True, world_size=2)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict({"micro_batch": 1, "grad_accum": 4, "gradient_checkpointing": False}).world_size == 1
    with pytest.raises(CheckpointCorrupt):
        Plan.from_dict({"micro_batch": 1})
    with pytest.raises(CheckpointCorrupt):
        Plan.from_dict({"micro_batch": 0, "grad_accum": 4, "gradient_checkpointing": False})


def test_replan_says_what_changed_on_another_gpu():
    old = Plan(4, 1, False).to_dict()
    assert describe_replan(None, Plan(4, 1, False), "", "Tesla T4") is None
    assert describe_replan(old, Plan(4, 1, False), "NVIDIA A100", "Tesla T4") is None
    text = describe_replan(old, Plan(2, 2, True), "NVIDIA A100-SXM4-40GB", "Tesla T4")
    assert text == (
        "re-planned on Tesla T4 (was NVIDIA A100-SXM4-40GB): micro-batch 4 → 2, accumulation 1 → 2, "
        "gradient checkpointing off → on; effective batch unchanged (4)"
    )


def test_replan_warns_when_the_effective_batch_changes():
    text = describe_replan(Plan(1, 2, True, 2).to_dict(), Plan(1, 2, True, 1), "2× Tesla T4", "Tesla T4")
    assert "GPUs 2 → 1" in text and "effective batch 4 → 2: this changes the training" in text


def _raised_while_handling_an_oom(*, cut: bool) -> RuntimeError:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError:
            capture_error = RuntimeError("CUDA error: operation failed due to a previous error during capture")
            if cut:
                raise capture_error from None
            raise capture_error  # noqa: B904 - the implicit context is what this test is about
    except RuntimeError as exc:
        return exc


def test_an_error_raised_while_handling_an_oom_counts_as_one():
    assert is_oom_error(_raised_while_handling_an_oom(cut=False))
    assert not is_oom_error(_raised_while_handling_an_oom(cut=True))  # `from None` cuts the chain
    assert not is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
