"""The order in which training examples are seen, and the held-out validation split: pure functions of
(seed, step, effective batch).

Order contract: every optimizer step consumes one *global* batch of
effective_batch = micro_batch × grad_accum × world examples, all from one
bucket. An epoch's global batches are built from a permutation seeded by
(seed, epoch): the permuted examples are grouped by bucket, each group is cut
into global batches and its last incomplete batch is filled up by wrapping
around to the start of the same group (so every example is seen every epoch
and every batch has the same size), and the batch list is shuffled with the
same seed. Step s uses batch s mod B of epoch s div B (B is the same for every
epoch). Rank r's micro-batch m is slice (m·world + r) of that batch. The data a
step consumes therefore depends only on (seed, step, effective batch), never on
saved RNG state nor on how the fit split the batch.

Must not: read images, touch the model, the cache files or storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runner.errors import DataError
from runner.train.seeds import HELD_OUT_SPLIT_TAG, generator

HOLD_OUT_ONE_IN = 10  # one example in ten (rounded up, at most data.validation_count) is held out for validation


def held_out_count(count: int, validation_count: int) -> int:
    """Examples held out for the validation loss: one in ten, rounded up, at most data.validation_count,
    so a small set of your own images loses one of them, not four."""
    return min(validation_count, -(-count // HOLD_OUT_ONE_IN))


def split_validation(count: int, validation_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): `held_out_count` of them, a seeded choice; both sorted."""
    held = held_out_count(count, validation_count)
    if held >= count:
        raise DataError(
            f"{count} example(s) with {held} held out for validation leave none to train",
            hint="add images, or set data.validation_count = 0 (no validation)",
        )
    order = torch.randperm(count, generator=generator(seed, HELD_OUT_SPLIT_TAG)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def epoch_batches(buckets: Sequence[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch, as positions into `buckets` (one bucket id per training example)."""
    gen = generator(seed, epoch)
    order = torch.randperm(len(buckets), generator=gen).tolist()
    groups: dict[int, list[int]] = {}
    for position in order:
        groups.setdefault(buckets[position], []).append(position)
    result = []
    for bucket in sorted(groups):
        members = groups[bucket]
        for start in range(0, len(members), batch):
            result.append([members[(start + k) % len(members)] for k in range(batch)])
    shuffle = torch.randperm(len(result), generator=gen).tolist()
    return [result[i] for i in shuffle]


def batches_per_epoch(buckets: Sequence[int], batch: int) -> int:
    """B: the number of global batches in every epoch."""
    sizes: dict[int, int] = {}
    for bucket in buckets:
        sizes[bucket] = sizes.get(bucket, 0) + 1
    return sum(math.ceil(n / batch) for n in sizes.values())


@dataclass
class StepOrder:
    """Which training examples each optimizer step, micro-batch and rank consumes (a pure function of the step)."""

    buckets: Sequence[int]  # bucket id of each training example
    micro_batch: int
    grad_accum: int
    world: int
    seed: int
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def step_batch(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based)."""
        per_epoch = batches_per_epoch(self.buckets, self.global_batch)
        epoch, index = divmod(step, per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self.buckets, self.global_batch, self.seed, epoch)}
        return self._epochs[epoch][index]

    def micro(self, step: int, micro: int, rank: int = 0) -> list[int]:
        """Training-example positions of micro-batch `micro` on rank `rank` in step `step`."""
        slot = micro * self.world + rank
        return self.step_batch(step)[slot * self.micro_batch : (slot + 1) * self.micro_batch]

    def slot_offset(self, micro: int, rank: int = 0) -> int:
        """Position of that micro-batch's first example within the global batch."""
        return (micro * self.world + rank) * self.micro_batch
