"""Seeds as pure functions of integers: every random draw in training (an example's flip, caption dropout,
timestep and noise; LoRA dropout and init; the epoch order; the held-out split) is seeded from
(seed, step, slot, tag…) here, so nothing random survives a step and a resume needs the step only.

Must not: keep a generator between calls, or read the global RNG.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the given integers (stable across Python runs)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
