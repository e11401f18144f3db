"""CUDA graphs of a micro-batch: forward, loss and scaled backward replayed as one launch.

Owns: capturing one graph per batch shape and kind (a micro-batch whose backward also all-reduces the
gradients, or not), after an eager warm-up whose effect on the gradient buffer is undone; the static
input buffers each graph reads, the ONE memory pool every graph shares, which shapes are captured at all
(a bounded set; the others, and shapes an out-of-memory backed off, run compiled-eager), and noticing
when a graph no longer matches the parameters it was captured on (then it is captured again).

Memory: graphs captured one after another into one pool (torch.cuda.graph_pool_handle()) may reuse
each other's memory because they read none of each other's outputs and their replays never overlap
(one micro-batch at a time, one stream; each graph's loss output stays allocated), so N shapes keep
about the largest shape's activations, not N times them
(https://docs.pytorch.org/docs/stable/notes/cuda.html#sharing-memory-across-captures). The warm-up of
a new shape runs outside any pool, so the pool is released first and every graph captured again after
it (captures are cheap next to compiling): the peak stays at the larger of one warm-up and the pool.
The warm-up's cached blocks are handed back (empty_cache) before the captures, for the pool to grow
into. Shapes run eagerly (not chosen, or backed off) still need their activations beside the pool.

Why: on a fast GPU, and on a notebook's slow CPU, an SDXL LoRA step is bound by the CPU issuing
~24,000 kernel launches, most of them small; a replayed graph issues them all at once.

Rules a captured micro-batch obeys (the Trainer sees to them): no CPU-GPU synchronisation and no
host-to-device copy inside it, autocast without its weight cache, no random draws on the GPU (LoRA
dropout 0; checkpointing without RNG state), and gradients accumulated into one flat buffer (the
.grad of every parameter is a view of it) that exists before capture and is zeroed in place, never
replaced. The warm-up runs no collective: a rank that captures must not run one its peers do not.

Must not: know about the optimizer, the scaler's update, storage or events.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_GRAPH_SHAPES = 6  # CUDA graphs for the most frequent latent shapes only; a new one recaptures the others


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Any  # the static batch the graph reads: a dataclass of tensors
    loss: torch.Tensor  # the static output the graph writes
    addresses: tuple[int, ...]  # data pointers of the parameters and .grad buffers at capture


def latent_key(shape: Sequence[int]) -> str:
    """One example's latent shape as "CxHxW" (what a bucket decides): the key graphs are kept under."""
    return "x".join(str(n) for n in shape)


def shape_key(batch: Any) -> str:
    """The latent shape of a micro-batch without its batch dimension (`latent_key`)."""
    return latent_key(batch.latents.shape[1:])


def capture_shapes(latents: Sequence[torch.Tensor], indices: Sequence[int]) -> frozenset[str]:
    """The MAX_GRAPH_SHAPES most frequent latent shapes among the examples `indices` (as `latent_key` writes
    them): a graph pays for its compile and capture over many steps; a rare shape runs compiled-eager instead."""
    counts = Counter(latent_key(latents[i].shape) for i in indices)
    return frozenset(shape for shape, _ in counts.most_common(MAX_GRAPH_SHAPES))


class MicroBatchGraphs:
    """Replays `micro(batch) -> loss` (which also runs the backward) as a CUDA graph per batch shape.

    `capture_shapes`: the shapes worth a graph (None: every shape); `eager_shapes`: shapes never captured.
    Other shapes run `micro` directly (the UNet's blocks are still compiled)."""

    def __init__(
        self,
        micro: Callable[[Any, bool], torch.Tensor],
        params: list[torch.nn.Parameter],
        grad_buffer: torch.Tensor,
        *,
        capture_shapes: frozenset[str] | None = None,
        eager_shapes: frozenset[str] = frozenset(),
    ) -> None:
        self.micro, self.params, self.grad_buffer = micro, params, grad_buffer
        self.capture_shapes, self.eager_shapes = capture_shapes, frozenset(eager_shapes)
        self.graphs: dict[tuple, _Captured] = {}
        self.pool: Any = None  # one handle for every capture, made at the first
        self.warmed: set[str] = set()  # shapes whose eager warm-up (and compile) ran
        self.captures = 0  # graphs captured for a new key
        self.recaptures = 0  # graphs captured again after the pool was released for a new shape

    def is_graphed(self, shape: str) -> bool:
        """Whether micro-batches of this shape run as a CUDA graph."""
        return shape not in self.eager_shapes and (self.capture_shapes is None or shape in self.capture_shapes)

    def run_eager(self, shape: str) -> None:
        """Never capture `shape` again; drop its graphs (their memory stays in the shared pool for the rest)."""
        self.eager_shapes = self.eager_shapes | {shape}
        for key in [k for k in self.graphs if k[1] == shape]:
            del self.graphs[key]
        if not self.graphs:
            self.pool = None  # see _release_pool: a pool no graph uses is never captured into again

    def _addresses(self) -> tuple[int, ...]:
        return (
            (self.grad_buffer.data_ptr(),)
            + tuple(p.data_ptr() for p in self.params)
            + tuple(p.grad.data_ptr() if p.grad is not None else 0 for p in self.params)
        )

    def run(self, batch: Any, reduce: bool = False) -> torch.Tensor:
        """Run one micro-batch through its graph (capturing it first if needed); returns the loss tensor.
        `reduce`: the graph of the micro-batch whose backward also all-reduces the gradients.

        The returned tensor is the graph's output: read it before the next call."""
        shape = shape_key(batch)
        if not self.is_graphed(shape):
            return self.micro(batch, reduce)
        key = (reduce, shape, *((t.shape, t.dtype) for t in _tensors(batch)))
        captured = self.graphs.get(key)
        if captured is not None and captured.addresses != self._addresses():
            log.info("CUDA graphs: parameters or gradients moved; capturing again")
            self.graphs.clear()
            self.pool = None
            captured = None
        if captured is None:
            captured = self._capture(batch, key)
        for static, value in zip(_tensors(captured.inputs), _tensors(batch), strict=True):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.loss

    def _capture(self, batch: Any, key: tuple) -> _Captured:
        """Warm up and capture `key`. A shape never warmed up first releases the pool (the other graphs are
        captured again after its warm-up, without one): its eager warm-up and compile then never need
        memory on top of what the pool keeps, so a new bucket fits wherever the largest one did."""
        if any(p.grad is None for p in self.params):
            raise RuntimeError("CUDA graphs need .grad buffers allocated before capture")
        static = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).clone() for f in _fields(batch)})
        kept: list[tuple[tuple, Any]] = []
        if key[1] not in self.warmed:  # new: compile it with the pool released (a known shape's other kind,
            # or a graph whose parameters moved, is compiled already and captures straight into the pool)
            kept = self._release_pool()
            self._warm_up(static)
            self.warmed.add(key[1])
            torch.cuda.empty_cache()  # the warm-up's cached blocks back to the device, for the pool to grow into
        self.pool = self.pool if self.pool is not None else torch.cuda.graph_pool_handle()
        for old_key, inputs in kept:  # in sequence into the one pool: their replays never overlap
            self.graphs[old_key] = self._record(inputs, old_key)
        self.recaptures += len(kept)
        captured = self.graphs[key] = self._record(static, key)
        self.captures += 1
        log.info("CUDA graphs: captured a micro-batch of shape %s (%d graphs)", key[1], len(self.graphs))
        return captured

    def _release_pool(self) -> list[tuple[tuple, Any]]:
        """Drop every graph and the pool they share; returns each one's key and static inputs.

        The next capture gets a new pool handle: the allocator keeps a pool no graph uses until its last
        tensor is freed, and refuses a capture into it meanwhile (an internal assert in
        CUDACachingAllocator's create_or_incref_pool), so a handle is never reused once its graphs are gone."""
        kept = [(key, captured.inputs) for key, captured in self.graphs.items()]
        if kept:
            torch.cuda.synchronize()  # no replay may still run in the memory handed back
            self.graphs.clear()
            gc.collect()
            torch.cuda.empty_cache()
        self.pool = None
        return kept

    def _warm_up(self, static: Any) -> None:
        """One eager micro-batch on a side stream (compiles, autotunes and allocates outside any capture);
        its accumulation into the gradient buffer is undone (loss slot included)."""
        saved = self.grad_buffer.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.micro(static, False)
        torch.cuda.current_stream().wait_stream(side)
        self.grad_buffer.copy_(saved)

    def _record(self, static: Any, key: tuple) -> _Captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = self.micro(static, key[0])
        return _Captured(graph, static, loss, self._addresses())


def _fields(batch: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]


def _tensors(batch: Any) -> list[torch.Tensor]:
    return [getattr(batch, f.name) for f in _fields(batch)]


def checkpoint_without_rng(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' gradient-checkpointing call without saving and restoring the RNG state, which a CUDA
    graph capture forbids; only valid when the checkpointed blocks draw no random numbers."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)
