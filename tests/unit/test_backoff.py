"""Out-of-memory at any step, CPU: the fit's ladder, and a TrainingRun that backs off on a fake OOM.

The fake raises torch's own OutOfMemoryError from the micro-batch of one batch shape while a plan
is above a memory line, as a GPU would; the session must go on with the effective batch unchanged,
train exactly what a run that started at the lower plan trains, resume bit for bit at that plan,
and end with a clear OutOfMemory (exit 1) when nothing fits, never looping.
"""

from __future__ import annotations

import json

import pytest
import torch

from runner.errors import EXIT_ERROR, OutOfMemory
from runner.events import EventBus, Planned
from runner.fit import Plan, candidate_plans, next_plan_after_oom, resume_candidates
from runner.profile import load_profile
from runner.train.cache import build_cache
from runner.train.loop import Trainer
from runner.train.lora import lora_state_dict
from runner.train.run import Placement, TrainingRun
from runner.train.testmodels import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROFILE = ['train.gradient_checkpointing="auto"', "train.steps=8"]


# --- the ladder (pure) -----------------------------------------------------------------------


def _ladder(plan: Plan, checkpointing: str, has_graph: bool) -> list[Plan]:
    rungs = [plan]
    while plan := next_plan_after_oom(plan, checkpointing=checkpointing, shape="4x8x8", has_graph=has_graph):
        rungs.append(plan)
        assert len(rungs) < 20, "the ladder loops"
    return rungs


def test_ladder_turns_checkpointing_on_then_eager_then_halves_the_micro_batch():
    rungs = _ladder(Plan(4, 1, False), "auto", has_graph=True)
    assert rungs == [
        Plan(4, 1, False),
        Plan(4, 1, True),
        Plan(4, 1, True, eager_shapes=("4x8x8",)),
        Plan(2, 2, True, eager_shapes=("4x8x8",)),
        Plan(1, 4, True, eager_shapes=("4x8x8",)),
    ]
    assert {p.effective_batch for p in rungs} == {4}


def test_ladder_never_turns_checkpointing_on_when_off_and_skips_eager_without_a_graph():
    assert _ladder(Plan(2, 1, False), "off", has_graph=False) == [Plan(2, 1, False), Plan(1, 2, False)]


def test_a_resume_on_the_same_gpu_starts_at_the_stored_plan_and_only_goes_down():
    candidates = candidate_plans(2, 2, "auto")
    stored = Plan(2, 2, True, eager_shapes=("4x8x8",)).to_dict()
    assert resume_candidates(candidates, stored, same_gpu=True) == [Plan.from_dict(stored), Plan(1, 4, True)]
    assert resume_candidates(candidates, stored, same_gpu=False) == candidates
    assert resume_candidates(candidates, None, same_gpu=True) == candidates
    assert Plan.from_dict(json.loads(json.dumps(stored))).eager_shapes == ("4x8x8",)


# --- a TrainingRun with a fake out-of-memory --------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny", PROFILE), folder, parts=build_tiny(0))
    return folder


@pytest.fixture
def fake_oom(monkeypatch):
    """Raise torch's OutOfMemoryError from micro-batches of `shape` while the trainer's micro-batch > `fits_at`
    (every micro-batch of that shape when fits_at is 0). Returns the list of (shape, micro_batch) it failed."""
    failures: list[tuple[str, int]] = []
    rule = {"shape": None, "fits_at": 1}
    real = Trainer._micro

    def micro(self, batch, reduce=False):
        shape = "x".join(str(n) for n in batch.latents.shape[1:])
        if shape == rule["shape"] and (rule["fits_at"] == 0 or self.micro_batch > rule["fits_at"]):
            failures.append((shape, self.micro_batch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real(self, batch, reduce)

    monkeypatch.setattr(Trainer, "_micro", micro)
    return rule, failures


def _run(cache_dir, bus=None, **kwargs) -> TrainingRun:
    return TrainingRun(
        load_profile("tiny", PROFILE), cache_dir, placement=Placement("cpu"), bus=bus or EventBus(), **kwargs
    )


def _shape_of_step(tr: TrainingRun, step: int) -> str:
    trainer = tr.trainer
    first = trainer.train_index[trainer.order.step_batch(step)[0]]
    return "x".join(str(n) for n in trainer.data.latents[first].shape)


def test_an_oom_at_a_later_step_backs_off_and_the_session_goes_on(cache_dir, fake_oom):
    rule, failures = fake_oom
    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    tr = _run(cache_dir, bus)
    assert tr.plan == Plan(2, 2, False)
    rule["shape"] = _shape_of_step(tr, 3)
    first_failure = next(s for s in range(8) if _shape_of_step(tr, s) == rule["shape"])
    losses = [tr.step(s).loss for s in range(8)]

    assert tr.plan == Plan(1, 4, True)  # checkpointing on did not help, half the micro-batch did
    assert tr.plan.effective_batch == 4 and tr.trainer.micro_batch == 1 and tr.trainer.grad_accum == 4
    assert len(failures) == 2 and all(m == 2 for _, m in failures)  # one per rung, then never again
    reasons = [e.reason for e in seen if isinstance(e, Planned) and e.reason]
    assert len(reasons) == 2 and f"out of memory at step {first_failure}" in reasons[0]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)

    # the failed attempts left nothing behind: the same as switching to the final plan before that step
    switched = _run(cache_dir)
    for s in range(8):
        if s == first_failure:
            switched.trainer.apply_plan(Plan(1, 4, True))
        assert switched.step(s).loss == losses[s]
    a, b = lora_state_dict(tr.unet), lora_state_dict(switched.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_after_a_back_off_is_bit_identical(cache_dir, fake_oom, tmp_path):
    rule, _ = fake_oom
    straight = _run(cache_dir)
    rule["shape"] = _shape_of_step(straight, 0)  # backs off at once
    straight_losses = [straight.step(s).loss for s in range(6)]

    first = _run(cache_dir)
    [first.step(s) for s in range(3)]
    meta = json.loads(json.dumps(first.save_state(tmp_path)))
    stored = json.loads(json.dumps(first.plan.to_dict()))  # what RunState.plan holds
    del first
    resumed = _run(cache_dir, stored_plan=stored, stored_gpu="CPU", gpu_name="CPU")
    assert resumed.plan == straight.plan == Plan(1, 4, True)
    resumed.restore(tmp_path, meta)
    assert [resumed.step(s).loss for s in range(3, 6)] == straight_losses[3:]
    a, b = lora_state_dict(straight.unet), lora_state_dict(resumed.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_oom_that_nothing_fixes_ends_with_a_clear_error_not_a_loop(cache_dir, fake_oom):
    rule, failures = fake_oom
    tr = _run(cache_dir)
    rule["shape"], rule["fits_at"] = _shape_of_step(tr, 0), 0
    before = {k: v.clone() for k, v in lora_state_dict(tr.unet).items()}
    with pytest.raises(OutOfMemory) as raised:
        tr.step(0)
    assert raised.value.exit_code == EXIT_ERROR
    assert "does not fit this GPU's free memory even at the lowest plan" in str(raised.value)
    assert "micro-batch 1 × 4 accumulation, gradient checkpointing on" in str(raised.value)
    assert "resolution" in raised.value.hint
    assert len(failures) == 3  # 2×2 off, 2×2 on, 1×4 on: each once
    after = lora_state_dict(tr.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated


def test_the_fit_probes_the_step_with_the_largest_batch_shape(cache_dir):
    tr = _run(cache_dir)
    trainer = tr.trainer
    step = trainer.largest_shape_step()
    sizes = {_shape_of_step(tr, s): trainer.data.latents[trainer.train_index[trainer.order.step_batch(s)[0]]].numel()
             for s in range(8)}  # fmt: skip
    assert len(sizes) > 1  # several shapes to choose from
    assert trainer.data.latents[trainer.train_index[trainer.order.step_batch(step)[0]]].numel() == max(sizes.values())
    assert step == min(s for s in range(8) if sizes[_shape_of_step(tr, s)] == max(sizes.values()))


def test_graphs_capture_only_the_chosen_shapes_and_run_the_rest_directly():
    from dataclasses import dataclass

    from runner.train.graphs import MicroBatchGraphs

    @dataclass
    class Batch:
        latents: torch.Tensor

    calls = []
    graphs = MicroBatchGraphs(
        lambda batch, reduce: calls.append(tuple(batch.latents.shape)) or batch.latents.sum(),
        [], torch.zeros(1), capture_shapes=frozenset({"4x8x8"}), eager_shapes=frozenset({"4x6x10"}),
    )  # fmt: skip
    assert graphs.is_graphed("4x8x8") and not graphs.is_graphed("4x6x10") and not graphs.is_graphed("4x10x6")
    graphs.run(Batch(torch.ones(1, 4, 10, 6)))  # neither chosen nor eager: runs as is, no capture (no GPU here)
    assert calls == [(1, 4, 10, 6)] and graphs.captures == 0
    graphs.run_eager("4x8x8")
    assert not graphs.is_graphed("4x8x8")


def test_the_memory_fit_on_a_gpu_probes_the_largest_batch_shape_and_leaves_the_lora_untouched(cache_dir, monkeypatch):
    """The fit's use of the probe, not only the helper: on a CUDA placement, the one probe step is the step
    with the largest batch shape (a first batch of small images would let a larger bucket run out of memory
    hours later). Trainers stay on the CPU; only the placement and torch.cuda's memory counters are faked."""
    for seed in range(1, 12):  # a data order whose first batch is not the largest, or the test proves nothing
        tr = TrainingRun(load_profile("tiny", [*PROFILE, f"train.seed={seed}"]), cache_dir, placement=Placement("cpu"),
                         bus=EventBus())  # fmt: skip
        largest = tr.trainer.largest_shape_step()
        if largest != 0:
            break
    assert largest != 0  # otherwise probing the first batch would pass this test too
    before = {k: v.clone() for k, v in lora_state_dict(tr.unet).items()}
    probed: list[int] = []
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self, s: probed.append(s) or real_step(self, s))
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    gpu, build_on_cpu = Placement("cuda:0"), tr._make_trainer

    def make_trainer(plan):
        tr.placement = Placement("cpu")
        try:
            return build_on_cpu(plan)
        finally:
            tr.placement = gpu

    monkeypatch.setattr(tr, "_make_trainer", make_trainer)
    tr.placement = gpu
    plan = tr._choose_plan(None, None, "Tesla T4")
    assert probed == [largest] and plan == Plan(2, 2, False)
    after = lora_state_dict(tr.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probe's update was undone
