"""Teacher-forced comparison of two trainers: each step starts both from the same weights, optimizer state and
loss scale, so the gradients of that one step are compared, not how far two runs drift apart.

Why: Adam moves every weight by about the learning rate whatever its gradient's size, so two fp16 runs whose
gradients differ by a rounding drift apart by several per cent within a few steps (bench/graphs_divergence.py:
a 0.1 % error put into the first update grows to 6 % in five steps with LoRA on the convolutions). A defect of
the captured path (a stale input, a missed weight update, RNG captured once) instead makes one step's gradients
differ far beyond rounding, which this measure shows."""

from __future__ import annotations

import torch

from runner.train.loop import Trainer


def copy_state(dst: Trainer, src: Trainer) -> None:
    """dst takes src's LoRA weights, AdamW state and loss scale, in place (captured graphs keep their inputs)."""
    with torch.no_grad():
        for p, q in zip(dst.params, src.params, strict=True):
            p.copy_(q)
            theirs, mine = src.optimizer.state.get(q), dst.optimizer.state.get(p)
            if theirs and mine:
                for key, value in theirs.items():
                    mine[key].copy_(value)
            elif theirs:
                dst.optimizer.state[p] = {key: value.clone() for key, value in theirs.items()}
    if src.scaler is not None and src.scaler._scale is not None and dst.scaler is not None:
        if dst.scaler._scale is None:
            dst.scaler._lazy_init_scale_growth_tracker(src.scaler._scale.device)
        dst.scaler._scale.copy_(src.scaler._scale)
        dst.scaler._growth_tracker.copy_(src.scaler._growth_tracker)


def flat_grads(t: Trainer) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten() for p in t.params]
    )


def forced_gradient_gaps(reference: Trainer, other: Trainer, steps: int) -> list[float]:
    """|g_other - g_ref| / |g_ref| of each step's (unscaled, clipped) gradients, both starting it from the
    reference's state."""
    gaps = []
    for step in range(steps):
        if step:
            copy_state(other, reference)
        reference.step(step)
        other.step(step)
        ref = flat_grads(reference)
        gaps.append(float((flat_grads(other) - ref).norm() / ref.norm()))
    return gaps
