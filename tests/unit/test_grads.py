"""The flat gradient buffer: gradients are views of it, and ranks exchange it bucket by bucket during the
backward with the same result as one all-reduce after it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runner.train import grads as grads_module
from runner.train.grads import LOSS_SLOTS, FlatGrads


def make_params(sizes=((3, 5), (7,), (4, 4), (130,), (2, 9))) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in sizes]


def test_gradients_accumulate_into_the_flat_buffer_and_zero_with_it():
    params = make_params()
    flat = FlatGrads(params)
    views = [p.grad for p in params]
    for _ in range(2):  # two micro-batches accumulate
        sum((p * (i + 1)).sum() for i, p in enumerate(params)).backward()
    for i, (param, view) in enumerate(zip(params, views, strict=True)):
        assert param.grad is view  # accumulated in place, never replaced
        assert param.grad.data_ptr() != param.data_ptr()
        torch.testing.assert_close(param.grad, torch.full_like(param, 2.0 * (i + 1)), rtol=0, atol=0)
    assert flat.flat.sum().item() == pytest.approx(sum(2.0 * (i + 1) * p.numel() for i, p in enumerate(params)))
    flat.add_loss(torch.tensor(1.5))
    flat.add_loss(torch.tensor(0.25))
    assert flat.loss.item() == 1.75
    flat.zero()
    assert all((p.grad == 0).all() for p in params) and flat.loss.item() == 0


def test_views_do_not_overlap_and_buckets_cover_the_buffer_in_order(monkeypatch):
    monkeypatch.setattr(grads_module, "BUCKET_BYTES", 64 * 4)  # 64 floats: several buckets
    params = make_params()
    flat = FlatGrads(params)
    owner = torch.full((flat.flat.numel(),), -1)
    for i, p in enumerate(params):
        start = (p.grad.data_ptr() - flat.flat.data_ptr()) // 4
        assert start % grads_module.ALIGN == 0 and start >= LOSS_SLOTS
        assert (owner[start : start + p.numel()] == -1).all()
        owner[start : start + p.numel()] = i
    assert (owner[:LOSS_SLOTS] == -1).all()  # the loss slot is nobody's gradient
    starts = [(p.grad.data_ptr() - flat.flat.data_ptr()) // 4 for p in params]
    assert starts == sorted(starts, reverse=True)  # last parameter first: its gradient is final first
    bounds = [(start, stop) for start, stop, _ in flat.buckets]
    assert bounds[0][0] == 0 and bounds[-1][1] == flat.flat.numel()
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # a partition, in order
    assert len(bounds) > 2
    for start, stop, members in flat.buckets:
        for i in members:
            assert start <= starts[i] and starts[i] + params[i].numel() <= stop


def _rank(rank: int, world: int, port: int, bucket_bytes: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads_module.BUCKET_BYTES = bucket_bytes
        torch.manual_seed(0)
        params = make_params()
        torch.manual_seed(100 + rank)  # each rank's own data
        inputs = [torch.randn_like(p) for p in params]
        results = []
        for overlap in (True, False):
            flat = FlatGrads(params, world)
            flat.add_loss(torch.tensor(float(rank + 1)))
            loss = sum((p * x).sum() for p, x in zip(params, inputs, strict=True))
            if overlap:  # bucket by bucket, as the gradients become final
                flat.begin_reduce()
                loss.backward()
                launched_in_backward = flat.buckets_launched
                flat.end_reduce()
            else:  # the whole buffer after the backward
                loss.backward()
                flat.reduce_now()
            flat.average()
            results.append(flat.flat.clone())
        assert launched_in_backward == len(flat.buckets) > 2  # every bucket left while the backward ran
        queue.put((rank, [r.tolist() for r in results], [x.tolist() for x in inputs]))  # plain data: no shared memory
    finally:
        dist.destroy_process_group()


def test_two_ranks_bucketed_reduce_equals_the_average_of_both_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, 2, port, 64 * 4, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2):
        rank, results, inputs = queue.get(timeout=120)
        got[rank] = ([torch.tensor(r) for r in results], [torch.tensor(x) for x in inputs])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    overlapped, after = got[0][0]
    torch.testing.assert_close(overlapped, after, rtol=0, atol=0)  # same bits either way
    torch.testing.assert_close(got[1][0][0], overlapped, rtol=0, atol=0)  # and on both ranks
    assert overlapped[0].item() == 1.5  # the loss slot: the mean of rank losses 1 and 2
    params = make_params_seeded()
    flat = FlatGrads(params)
    for p, a, b in zip(params, got[0][1], got[1][1], strict=True):
        start = (p.grad.data_ptr() - flat.flat.data_ptr()) // 4
        torch.testing.assert_close(overlapped[start : start + p.numel()].view_as(p), (a + b).view_as(p) / 2)


def make_params_seeded() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return make_params()


def test_lora_forward_order_puts_the_mid_block_between_down_and_up_blocks():
    from runner.profile import LoraConfig
    from runner.train.lora import attach_lora, lora_forward_order
    from runner.train.testmodels import build_tiny

    unet = build_tiny(0).unet
    attach_lora(unet, LoraConfig(rank=4, alpha=4))
    names = [name for name, _ in unet.named_parameters() if "lora_" in name]
    order = lora_forward_order(unet)
    assert sorted(order) == list(range(len(names)))
    parts = [names[i].split(".")[0] for i in order]
    assert parts == sorted(parts, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert {"down_blocks", "mid_block", "up_blocks"} == set(parts)
    for part in set(parts):  # within a part, the registration order (the forward's, block by block)
        mine = [i for i in order if names[i].startswith(part)]
        assert mine == sorted(mine)
