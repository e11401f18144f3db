"""Is the gap between CUDA-graph and compiled-blocks training rounding noise, or a defect of the captured path?

The tiny SDXL-architecture model, micro-batch 2 × accumulation 2, checkpointing on, lr 1e-3 (as
tests/gpu/test_text_encoder_gpu.py), for each LoRA layout (attention only; text encoders too; ResNet convs and
feed-forward too), precision and seed, several trainers run the same steps side by side:

  off           eager (the reference when nothing is compiled)
  off-again     eager once more: the run-to-run spread of the GPU's own kernels
  eager-graphs  the captured micro-batch (runner/train/graphs.py) around the EAGER blocks: the capture path
                alone, with the same kernels as `off` (compiling patched out)
  blocks        compiled blocks (the reference of the GPU test); blocks-again: its own spread
  graphs        compiled blocks captured as CUDA graphs (what train.compile = "auto" runs)
  perturbed     eager, with a 0.1 % relative error put into the first update: how far an error the size
                of fp16 rounding grows under Adam in these steps (the yardstick for "noise")

Two measures, per step:
  free     |w_mode - w_ref| / |w_ref - w_start| over all LoRA weights, each trainer on its own (what the test bounds);
  forced   before each step every trainer is given the reference's weights, optimizer state and loss scale, so
           the gradients of that one step are compared from identical weights: |g_mode - g_ref| / |g_ref|.
           A stale input, a missed weight update or RNG captured once shows here as a jump far above rounding.

    python3 bench/graphs_divergence.py --device cpu --precisions fp32 --modes off,off-again,perturbed   # CPU check
    python3 bench/graphs_divergence.py --json $OUT/divergence.json   # on a GPU: eager, capture and compiled modes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from runner.profile import load_profile  # noqa: E402
from runner.train import prepare  # noqa: E402
from runner.train.cache import build_cache, open_cache  # noqa: E402
from runner.train.loop import Trainer  # noqa: E402
from runner.train.lora import TextEncoders, lora_state_dict  # noqa: E402
from runner.train.testmodels import build_tiny  # noqa: E402

MANY = 'lora.targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]'  # fmt: skip
TE = ["lora.text_encoder=true", "lora.text_encoder_lr=1e-3", "data.caption_dropout=0.2"]
LAYOUTS = {"attention": [], "text-encoders": TE, "convs-ff": [MANY]}
COMPILE = {"off": "off", "off-again": "off", "perturbed": "off", "eager-graphs": "graphs", "blocks": "blocks",
           "blocks-again": "blocks", "graphs": "graphs"}  # fmt: skip


@contextmanager
def no_compile():
    """Trainer with train.compile = "graphs" but eager blocks: the capture path alone."""
    saved = prepare.compile_blocks
    prepare.compile_blocks = lambda unet: 0
    try:
        yield
    finally:
        prepare.compile_blocks = saved


def make(cached, layout: str, mode: str, precision: str, seed: int, device: str) -> Trainer:
    sets = [*LAYOUTS[layout], f'train.compile="{COMPILE[mode]}"', f'train.precision="{precision}"', "train.lr=1e-3",
            f"train.seed={seed}", "data.caption_dropout=0.2"]  # fmt: skip
    parts = build_tiny(0)
    encoders = TextEncoders(parts.text_encoder, parts.text_encoder_2) if layout == "text-encoders" else None
    ctx = no_compile() if mode == "eager-graphs" else _null()
    with ctx:
        return Trainer(load_profile("tiny", sets), cached, parts.unet.to(device), micro_batch=2, grad_accum=2,
                       gradient_checkpointing=True, device=device, text_encoders=encoders)  # fmt: skip


@contextmanager
def _null():
    yield


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in lora_state_dict(t.unet, t.encoders).items()}


def gap(a: dict, b: dict, start: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    den = sum(float((a[k] - start[k]).pow(2).sum()) for k in a) ** 0.5
    return num / den if den else float("nan")


def grads(t: Trainer) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten().cpu()
                      for p in t.params])  # fmt: skip


def force(dst: Trainer, src: Trainer) -> None:
    """dst takes src's weights, optimizer state and loss scale, in place (graph inputs keep their addresses)."""
    with torch.no_grad():
        for p, q in zip(dst.params, src.params, strict=True):
            p.copy_(q)
            sd, ss = dst.optimizer.state.get(p), src.optimizer.state.get(q)
            if ss:
                if not sd:
                    dst.optimizer.state[p] = {k: v.clone() for k, v in ss.items()}
                else:
                    for k, v in ss.items():
                        sd[k].copy_(v)
    if dst.scaler is not None and src.scaler is not None and src.scaler._scale is not None:
        if dst.scaler._scale is None:
            dst.scaler._lazy_init_scale_growth_tracker(src.scaler._scale.device)
        dst.scaler._scale.copy_(src.scaler._scale)
        dst.scaler._growth_tracker.copy_(src.scaler._growth_tracker)


def perturb(t: Trainer, start: dict[str, torch.Tensor], scale: float = 1e-3) -> None:
    """A relative error of `scale` in the update so far (the size of an fp16 rounding)."""
    gen = torch.Generator().manual_seed(1234)
    now = lora_state_dict(t.unet, t.encoders)
    names = list(now)
    with torch.no_grad():
        for name, p in zip(names, _live(t, names), strict=True):
            moved = now[name] - start[name].float()
            noise = torch.randn(moved.shape, generator=gen) * moved.abs() * scale
            p.add_(noise.to(p.device, p.dtype))


def _live(t: Trainer, names: list[str]) -> list[torch.Tensor]:
    from runner.train.lora import lora_tensors

    live = lora_tensors(t.unet, t.encoders)
    return [live[n] for n in names]


def run_case(cached, layout, precision, seed, modes, steps, device) -> dict:
    ref_mode = "blocks" if "blocks" in modes else "off"
    free = {m: make(cached, layout, m, precision, seed, device) for m in modes}
    start = weights(free[ref_mode])
    curves: dict[str, list[float]] = {m: [] for m in modes if m != ref_mode}
    losses: dict[str, list[float]] = {m: [] for m in modes}
    for step in range(steps):
        for m, t in free.items():
            losses[m].append(round(t.step(step).loss, 6))
            if m == "perturbed" and step == 0:
                perturb(t, start)
        ref = weights(free[ref_mode])
        for m in curves:
            curves[m].append(round(gap(weights(free[m]), ref, start), 6))
    del free
    forced_modes = [m for m in modes if m not in ("perturbed",)]
    pinned = {m: make(cached, layout, m, precision, seed, device) for m in forced_modes}
    forced: dict[str, list[float]] = {m: [] for m in forced_modes if m != ref_mode}
    for step in range(steps):
        for m, t in pinned.items():
            if m != ref_mode and step > 0:
                force(t, pinned[ref_mode])
        for t in pinned.values():
            t.step(step)
        g_ref = grads(pinned[ref_mode])
        for m in forced:
            forced[m].append(round(float((grads(pinned[m]) - g_ref).norm() / g_ref.norm()), 6))
    del pinned
    return {"layout": layout, "precision": precision, "seed": seed, "reference": ref_mode, "free": curves,
            "forced_grad_gap": forced, "losses": losses}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layouts", default="attention,text-encoders,convs-ff")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="off,off-again,eager-graphs,perturbed")
    p.add_argument("--compiled-modes", default="blocks,blocks-again,graphs",
                   help="added for fp16 with --compiled-seeds seeds (compiling costs minutes)")  # fmt: skip
    p.add_argument("--compiled-seeds", default="0")
    p.add_argument("--compiled-precisions", default="fp16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="relay-div-"))
    build_cache(load_profile("tiny", TE), folder, parts=build_tiny(0))
    cached = open_cache(folder)
    results = []
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    cases = [(lay, prec, int(seed), split(args.modes)) for prec in split(args.precisions)
             for lay in split(args.layouts) for seed in split(args.seeds)]  # fmt: skip
    if args.device != "cpu":
        cases += [(lay, prec, int(seed), split(args.compiled_modes)) for prec in split(args.compiled_precisions)
                  for lay in split(args.layouts) for seed in split(args.compiled_seeds)]  # fmt: skip
    for layout, precision, seed, modes in cases:
        t0 = time.perf_counter()
        result = run_case(cached, layout, precision, seed, modes, args.steps, args.device)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(result)
        print(summary(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def summary(r: dict) -> str:
    head = f"{r['layout']:<14} {r['precision']} seed {r['seed']} vs {r['reference']} ({r['seconds']} s)"
    lines = [head]
    for m, curve in r["free"].items():
        forced = r["forced_grad_gap"].get(m)
        forced_text = f"; forced grad gap per step {forced}" if forced else ""
        lines.append(f"   {m:<13} free gap per step {curve}{forced_text}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
