"""A bucketed run on a CUDA GPU (tiny SDXL-architecture model, several aspect buckets, CUDA graphs, fp16).

Every batch shape gets ready once (its compile and capture timed), the graphs share one memory pool and
only the most frequent shapes are captured, and an out-of-memory at a later step for one shape backs
off (checkpointing on, then that shape eager) while the run goes on with the effective batch unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

from runner.events import EventBus, ShapeReady
from runner.fit import Plan
from runner.profile import load_profile
from runner.train.cache import build_cache
from runner.train.graphs import MAX_GRAPH_SHAPES, MicroBatchGraphs
from runner.train.run import Placement, TrainingRun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROFILE = [
    'train.compile="graphs"', 'train.precision="fp16"', 'train.gradient_checkpointing="auto"',
    "train.steps=40", "data.generated_count=40", "data.validation_count=0", "train.lr=1e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(load_profile("tiny", PROFILE), folder)
    return folder


def _run(cache_dir, bus: EventBus) -> TrainingRun:
    return TrainingRun(load_profile("tiny", PROFILE), cache_dir, placement=Placement("cuda:0"), bus=bus)


def _shape_of_step(tr: TrainingRun, step: int) -> str:
    trainer = tr.trainer
    return "x".join(str(n) for n in trainer.data.latents[trainer.train_index[trainer.order.step_batch(step)[0]]].shape)


def test_every_bucket_shape_gets_ready_once_in_one_shared_pool(cache_dir):
    seen: list = []
    bus = EventBus()
    bus.subscribe(seen.append)
    tr = _run(cache_dir, bus)
    assert tr.trainer.compiled == "graphs"
    shapes = {_shape_of_step(tr, s) for s in range(20)}
    assert len(shapes) > 1, "the tiny generated data should fall in several buckets"
    seen.clear()  # the fit's probe got its own shape ready on a throwaway trainer
    results = [tr.step(s) for s in range(20)]
    assert all(math.isfinite(r.loss) for r in results)
    ready = [e for e in seen if isinstance(e, ShapeReady)]
    assert sorted(e.shape for e in ready) == sorted(shapes)  # each shape once, never again
    assert all(e.seconds > 0 for e in ready)
    assert sum(r.setup_s for r in results) == pytest.approx(sum(e.seconds for e in ready), rel=1e-6)
    graphs: MicroBatchGraphs = tr.trainer.graphs
    captured = {key[1] for key in graphs.graphs}
    assert captured <= graphs.capture_shapes and len(graphs.capture_shapes) <= MAX_GRAPH_SHAPES
    assert graphs.pool is not None  # one handle, passed to every capture
    # each new shape released the pool for its warm-up and captured the earlier ones again
    assert graphs.captures == len(captured) and graphs.recaptures == len(captured) * (len(captured) - 1) // 2


def test_an_oom_of_one_graphed_shape_at_a_later_step_backs_off_and_training_goes_on(cache_dir, monkeypatch):
    bus = EventBus()
    tr = _run(cache_dir, bus)
    assert tr.plan == Plan(2, 2, False)
    target = _shape_of_step(tr, 5)
    real = MicroBatchGraphs.run

    def run(self, batch, reduce=False):
        shape = "x".join(str(n) for n in batch.latents.shape[1:])
        if shape == target and self.is_graphed(shape):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (fake)")
        return real(self, batch, reduce)

    monkeypatch.setattr(MicroBatchGraphs, "run", run)
    results = [tr.step(s) for s in range(12)]
    assert all(math.isfinite(r.loss) for r in results)
    assert tr.plan == Plan(2, 2, True, eager_shapes=(target,))
    assert tr.plan.effective_batch == 4 and tr.trainer.gradient_checkpointing
    assert not any(key[1] == target for key in tr.trainer.graphs.graphs)
