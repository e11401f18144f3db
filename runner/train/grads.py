"""The LoRA gradients as views into one flat buffer, and their average over ranks.

Owns: the flat fp32 buffer every LoRA parameter's .grad is a view of (zeroed with one launch, never
replaced, so a CUDA graph can accumulate into it and an all-reduce needs no copies), the step's loss
kept in the buffer's first slot (it travels with the gradients), and the all-reduce of that buffer:
either at once after the backward, or bucket by bucket during it (issued in a fixed order as their
gradients become final, on NCCL's own stream), which is how it goes inside a CUDA graph capture: the
collectives are captured with the backward and replayed with it. bench/RESULTS.md has the figures.

Must not: know about the optimizer, the scaler, the data or the step number.
"""

from __future__ import annotations

import functools
import weakref

import torch

BUCKET_BYTES = 8 * 2**20  # gradients per all-reduce; the first ones start while most of the backward is left
ALIGN = 64  # elements: each view starts 256-byte aligned, as vectorized optimizer kernels prefer
LOSS_SLOTS = ALIGN  # the first ALIGN elements hold the loss (slot 0); the rest is padding


class FlatGrads:
    """Every parameter's .grad as a view into `flat`; the step's loss accumulated into `flat[0]`.

    Parameters are laid out in the reverse of `forward_order` (indices into `params`; default: their
    order), the order the backward finishes their gradients, so the buckets at the start of the buffer
    are complete first."""

    def __init__(
        self, params: list[torch.nn.Parameter], world: int = 1, forward_order: list[int] | None = None
    ) -> None:
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("a flat gradient buffer needs parameters of one dtype on one device")
        order = list(range(len(params))) if forward_order is None else list(forward_order)
        if sorted(order) != list(range(len(params))):
            raise ValueError("forward_order must list every parameter index once")
        self.params, self.world = params, world
        offsets, end = {}, LOSS_SLOTS
        for index in reversed(order):
            offsets[index] = end
            end += -(-params[index].numel() // ALIGN) * ALIGN
        self.flat = torch.zeros(end, dtype=params[0].dtype, device=params[0].device)
        for index, param in enumerate(params):
            param.grad = self.flat[offsets[index] : offsets[index] + param.numel()].view_as(param)
        self.buckets = _buckets(offsets, params, self.flat.element_size(), end)
        self._bucket_of = {i: b for b, (_, _, members) in enumerate(self.buckets) for i in members}
        self._waiting: list[int] = []
        self._next = 0
        self._works: list = []
        self._reducing = False
        if world > 1 and torch.distributed.is_initialized():
            # NCCL sets up its communicator on the first collective, which must not be inside a CUDA graph
            # capture: make that first one here (the loss slots are zeros, and stay so)
            torch.distributed.all_reduce(self.flat[:LOSS_SLOTS])
        me = weakref.ref(self)  # the hooks outlive this buffer when a later trainer reuses the UNet
        for index, param in enumerate(params):
            param.register_post_accumulate_grad_hook(functools.partial(_grad_ready, me, index))

    @property
    def loss(self) -> torch.Tensor:
        """The step's loss so far (averaged over ranks once reduced), a 0-d view."""
        return self.flat[0]

    @property
    def buckets_launched(self) -> int:
        """How many buckets' all-reduce has been issued since begin_reduce."""
        return self._next

    def zero(self) -> None:
        self.flat.zero_()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.flat[0].add_(loss.detach().to(self.flat.dtype))

    def average(self) -> None:
        """Divide the reduced sums by the number of ranks (no-op on one)."""
        if self.world > 1:
            self.flat.div_(self.world)

    # --- the all-reduce during the backward ---------------------------------------------------

    def begin_reduce(self) -> None:
        """Reduce each bucket as soon as the backward that follows has finished its gradients."""
        self._waiting = [len(members) for _, _, members in self.buckets]
        self._next, self._works, self._reducing = 0, [], True
        self._launch_ready()  # a bucket holding only the loss is ready before the backward starts

    def end_reduce(self) -> None:
        """Reduce the buckets the backward did not finish (parameters that got no gradient), then make
        the current stream wait for every reduction."""
        self._reducing = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        for work in self._works:
            work.wait()
        self._works = []

    def reduce_now(self) -> None:
        """The whole buffer in one all-reduce, after the backward."""
        torch.distributed.all_reduce(self.flat)

    def _grad_ready(self, index: int) -> None:
        if self._reducing:
            self._waiting[self._bucket_of[index]] -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        # in bucket order only: every rank must issue the same collectives in the same order
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            self._launch(self._next)

    def _launch(self, bucket: int) -> None:
        start, stop, _ = self.buckets[bucket]
        self._works.append(torch.distributed.all_reduce(self.flat[start:stop], async_op=True))
        self._next = bucket + 1


def _grad_ready(ref: weakref.ref, index: int, _param: torch.Tensor) -> None:
    grads = ref()
    if grads is not None:
        grads._grad_ready(index)


def _buckets(
    offsets: dict[int, int], params: list[torch.nn.Parameter], element_bytes: int, end: int
) -> list[tuple[int, int, list[int]]]:
    """(start, stop, parameter indices) of each bucket, in buffer order; the loss slots open the first."""
    limit = max(1, BUCKET_BYTES // element_bytes)
    buckets: list[tuple[int, int, list[int]]] = []
    start, members = 0, []
    for index in sorted(offsets, key=offsets.get):
        stop = offsets[index] + params[index].numel()
        members.append(index)
        if stop - start >= limit:
            buckets.append((start, stop, members))
            start, members = stop, []
    if members or start < end:
        buckets.append((start, end, members))
    return buckets
