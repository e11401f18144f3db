"""Seeds as pure functions of integers: every random draw in training (an example's flip, caption dropout,
timestep and noise; LoRA dropout and init; the epoch order; the held-out split) is seeded from
(seed, step, slot, tag…) here, so nothing random survives a step and a resume needs the step only.

Must not: keep a generator between calls, or read the global RNG.
"""

from __future__ import annotations

import hashlib

import torch

# The tags that keep each kind of draw apart; every value is distinct, which is why they stand together here.
DROPOUT_TAG = 1  # LoRA dropout, reseeded before each micro-batch (with the step and the global slot)
LORA_INIT_TAG = 2  # the UNet's LoRA init
VALIDATION_DRAWS_TAG = 3  # the held-out examples' fixed timestep and noise (with the example's number)
TEXT_LORA_INIT_TAG = 4  # the text encoders' LoRA init
HELD_OUT_SPLIT_TAG = 2**31 - 1  # which examples are held out (apart from every epoch's permutation)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the given integers (stable across Python runs)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
