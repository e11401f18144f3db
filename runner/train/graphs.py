"""CUDA graphs of a micro-batch: forward, loss and scaled backward replayed as one launch.

Owns: capturing one graph per batch shape and kind (a micro-batch whose backward also all-reduces the
gradients, or not), after an eager warm-up whose effect on the gradient buffer is undone; the static
input buffers each graph reads, the memory pool the graphs share, and noticing when a graph no longer
matches the parameters it was captured on (then it is captured again).

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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Any  # the static batch the graph reads: a dataclass of tensors
    loss: torch.Tensor  # the static output the graph writes
    addresses: tuple[int, ...]  # data pointers of the parameters and .grad buffers at capture


class MicroBatchGraphs:
    """Replays `micro(batch) -> loss` (which also runs the backward) as a CUDA graph per batch shape."""

    def __init__(
        self,
        micro: Callable[[Any, bool], torch.Tensor],
        params: list[torch.nn.Parameter],
        grad_buffer: torch.Tensor,
    ) -> None:
        self.micro, self.params, self.grad_buffer = micro, params, grad_buffer
        self.graphs: dict[tuple, _Captured] = {}
        self.pool: Any = None
        self.captures = 0

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
        key = (reduce, *((t.shape, t.dtype) for t in _tensors(batch)))
        captured = self.graphs.get(key)
        if captured is not None and captured.addresses != self._addresses():
            log.info("CUDA graphs: parameters or gradients moved; capturing again")
            self.graphs.clear()
            captured = None
        if captured is None:
            captured = self._capture(batch, key)
        for static, value in zip(_tensors(captured.inputs), _tensors(batch), strict=True):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.loss

    def _capture(self, batch: Any, key: tuple) -> _Captured:
        if any(p.grad is None for p in self.params):
            raise RuntimeError("CUDA graphs need .grad buffers allocated before capture")
        static = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).clone() for f in _fields(batch)})
        saved = self.grad_buffer.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles, autotunes and allocates outside the capture
            self.micro(static, False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = self.micro(static, key[0])
        self.grad_buffer.copy_(saved)  # undo the warm-up's accumulation (loss slot included)
        del saved
        self.pool = self.pool if self.pool is not None else graph.pool()
        self.captures += 1
        captured = _Captured(graph, static, loss, self._addresses())
        self.graphs[key] = captured
        log.info("CUDA graphs: captured a micro-batch of shape %s (%d graphs)", key[1][0], len(self.graphs))
        return captured


def _fields(batch: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]


def _tensors(batch: Any) -> list[torch.Tensor]:
    return [getattr(batch, f.name) for f in _fields(batch)]


def checkpoint_without_rng(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' gradient-checkpointing call without saving and restoring the RNG state, which a CUDA
    graph capture forbids; only valid when the checkpointed blocks draw no random numbers."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)
