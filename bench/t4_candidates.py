# ruff: noqa: B023, B905  (each timed closure runs inside the loop iteration that defines it)
"""What each candidate change to the T4 step could save, measured on the pieces it changes (no compile).

Run under the T4 emulation on the device machine (carry .t4):
    bash .t4/t4-emulate.sh python3 bench/t4_candidates.py
Times (CUDA events, median of repeats, fp16 under autocast, SDXL's 1024 px shapes):
  conv     a 3x3 convolution forward + input gradient (the UNet is frozen: no weight gradient), NCHW vs
           channels-last, cudnn.benchmark off/on, at each UNet level;
  attn     scaled_dot_product_attention forward + backward, memory-efficient (what a T4 runs) vs flash vs math;
  lora     three rank-16 LoRA branches on one input (q, k, v) as peft runs them vs one fused A matmul;
  launch   the cost of one small kernel inside a replayed CUDA graph (what 24,000 launches a step cost).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

DEV = "cuda"


def timed(fn, reps: int = 20, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def conv_rows() -> list[str]:
    rows = []
    for c, hw, count in ((320, 128, 10), (640, 64, 12), (1280, 32, 14)):  # rough count of 3x3 convs per level
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            res = {}
            for fmt in ("nchw", "nhwc"):
                mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
                w = torch.randn(c, c, 3, 3, device=DEV, dtype=torch.float16).to(memory_format=mf)
                x = torch.randn(1, c, hw, hw, device=DEV, dtype=torch.float16).to(memory_format=mf).requires_grad_()
                g = torch.randn(1, c, hw, hw, device=DEV, dtype=torch.float16).to(memory_format=mf)

                def run(x=x, w=w, g=g):
                    y = F.conv2d(x, w, padding=1)
                    (gx,) = torch.autograd.grad(y, x, g)

                res[fmt] = timed(run)
            rows.append(f"conv {c}ch {hw}x{hw} benchmark={bench_mode}: NCHW {res['nchw'] * 1e3:.2f} ms, "
                        f"channels-last {res['nhwc'] * 1e3:.2f} ms (x~{count} a step: "
                        f"{(res['nchw'] - res['nhwc']) * count * 1e3:+.1f} ms)")  # fmt: skip
    torch.backends.cudnn.benchmark = False
    return rows


def attn_rows() -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n, heads, count in ((4096, 10, 10), (1024, 20, 60)):
        q, k, v = (torch.randn(1, heads, n, 64, device=DEV, dtype=torch.float16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, heads, n, 64, device=DEV, dtype=torch.float16)
        res = {}
        for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("math", SDPBackend.MATH)):  # fmt: skip

            def run(backend=backend):
                with sdpa_kernel(backend):
                    y = F.scaled_dot_product_attention(q, k, v)
                torch.autograd.grad(y, (q, k, v), g)

            try:
                res[name] = timed(run, reps=10)
            except RuntimeError as exc:
                res[name] = float("nan")
                rows.append(f"  attn {name}: {str(exc).splitlines()[0][:100]}")
        flop = 4 * n * n * 64 * heads * 3.5
        rows.append(f"attn {n} tokens x {heads} heads fwd+bwd: " + ", ".join(
            f"{k} {v * 1e3:.2f} ms ({flop / v / 1e12:.0f} TFLOP/s)" for k, v in res.items())
            + f" (x{count} self-attentions a step: efficient {res['efficient'] * count:.3f} s)")  # fmt: skip
    return rows


def lora_rows() -> list[str]:
    rows = []
    for n, c, count in ((4096, 640, 10), (1024, 1280, 60)):
        x = torch.randn(n, c, device=DEV, dtype=torch.float16, requires_grad=True)
        base = [torch.randn(c, c, device=DEV, dtype=torch.float16) for _ in range(3)]
        a = [torch.randn(16, c, device=DEV, requires_grad=True) for _ in range(3)]
        b = [torch.randn(c, 16, device=DEV, requires_grad=True) for _ in range(3)]
        g = torch.randn(n, c, device=DEV, dtype=torch.float16)

        def base_only():
            with torch.autocast("cuda", torch.float16):
                ys = [F.linear(x, w) for w in base]
            torch.autograd.grad(sum(ys), x, g)

        def peft_like():
            with torch.autocast("cuda", torch.float16):
                ys = [F.linear(x, w) + F.linear(F.linear(x, ai), bi) * 2.0 for w, ai, bi in zip(base, a, b)]
            torch.autograd.grad(sum(ys), [x, *a, *b], g)

        def fused():
            with torch.autocast("cuda", torch.float16):
                h = F.linear(x, torch.cat(a))  # one [3r, C] matmul for the three branches
                ys = [F.linear(x, w) + F.linear(hi, bi) * 2.0 for w, hi, bi in zip(base, h.split(16, dim=1), b)]
            torch.autograd.grad(sum(ys), [x, *a, *b], g)

        t0, t1, t2 = timed(base_only), timed(peft_like), timed(fused)
        rows.append(f"lora q/k/v {n}x{c}: frozen linears {t0 * 1e3:.2f} ms, + 3 LoRA as peft {t1 * 1e3:.2f} ms "
                    f"(LoRA {(t1 - t0) * 1e3:.2f} ms), fused A {t2 * 1e3:.2f} ms; x{count} blocks: LoRA "
                    f"{(t1 - t0) * count:.3f} s a step, fused saves {(t1 - t2) * count:.3f} s")  # fmt: skip
    return rows


def launch_rows() -> list[str]:
    x = torch.zeros(1024, device=DEV)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        for _ in range(2000):
            x.add_(1)
    t = timed(graph.replay, reps=10)
    return [f"launch: one tiny kernel inside a replayed graph {t / 2000 * 1e6:.2f} us (x24,000 a step: {t * 12:.3f} s)"]


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for part in (launch_rows, lora_rows, attn_rows, conv_rows):
        try:
            for row in part():
                print(row, flush=True)
        except Exception as exc:  # one part failing must not hide the others
            print(f"{part.__name__} failed: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
