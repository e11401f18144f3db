#!/usr/bin/env bash
# Two-GPU figures behind bench/RESULTS.md: images/s on one vs two GPUs (full-size random SDXL, 1024 px,
# 15 GiB cap, CUDA graphs), a SIGKILL-and-resume of `relay train` on both GPUs, and (beside it) the GPU tests
# of CUDA graphs.
# Run on a 2-GPU device machine from the repository root: bash bench/archive-2026-11/ddp_suite.sh
set -uo pipefail
OUT="${OUT:-bench/out}"; mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
show() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('world','micro_batch','gradient_checkpointing','compiled','step_s_median','images_per_s','peak_allocated_gib','peak_reserved_gib','floor_step_s','overhead_vs_floor_pct','checkpoint_save_s')})" "$1" || tail -n 20 "${1%.json}.err"; }
echo "== 1024 px batch 1, one GPU (CUDA graphs)"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m runner bench --vram-gib 15 --resolution 1024 --compile graphs --steps 20 --skip-resume --json >"$OUT/g1.json" 2>"$OUT/g1.err"; show "$OUT/g1.json"
echo "== 1024 px batch 1 per GPU, two GPUs (CUDA graphs)"
RELAY_PROCESSES=2 timeout 200 python3 -m runner bench --vram-gib 15 --resolution 1024 --compile graphs --steps 20 --skip-resume --json >"$OUT/g2.json" 2>"$OUT/g2.err"; show "$OUT/g2.json"
(python3 -m pytest -q -m gpu tests/gpu -k graphs -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "GPU tests exit $?" >>"$OUT/gpu_tests.log") &
tests=$!
echo "== relay train on both GPUs: uninterrupted, then killed with SIGKILL and resumed"
T="--profile tiny --plain --set train.steps=200 --set checkpoint.every_min=0.03 --set train.compile=off"
python3 -m runner train $T --storage /tmp/ref --workdir /tmp/wref >/tmp/ref.log 2>&1; echo "reference exit $?"
python3 -m runner train $T --storage /tmp/ref2 --workdir /tmp/wref2 >/tmp/ref2.log 2>&1; echo "second reference exit $? (GPU run-to-run noise floor)"
setsid python3 -m runner train $T --storage /tmp/kill --workdir /tmp/wkill >/tmp/kill1.log 2>&1 &
pid=$!
for _ in $(seq 120); do sleep 1; [[ $(ls /tmp/kill/tiny/checkpoints/*/COMMIT.json 2>/dev/null | wc -l) -ge 2 ]] && break; done
sleep 1.3; kill -9 -- -$pid; wait $pid 2>/dev/null
echo "killed; committed before the kill: $(ls /tmp/kill/tiny/checkpoints)"
python3 -m runner train $T --storage /tmp/kill --workdir /tmp/wkill2 >/tmp/kill2.log 2>&1; echo "resumed exit $?"
grep -h "step_from" /tmp/kill/tiny/sessions.jsonl | python3 -c "import sys, json; [print({k: json.loads(l)[k] for k in ('gpu','step_from','step_to','reason')}) for l in sys.stdin]"
python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/ref/tiny/final/pytorch_lora_weights.safetensors")
b = load_file("/tmp/kill/tiny/final/pytorch_lora_weights.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
same = all((a[k] == b[k]).all().item() for k in a)
print(f"final LoRA: {len(a)} tensors, bit-identical={same}, max abs diff={diff:.3g}")
c = load_file("/tmp/ref2/tiny/final/pytorch_lora_weights.safetensors")
print(f"two uninterrupted runs: max abs diff={max((a[k].float() - c[k].float()).abs().max().item() for k in a):.3g}")
PY
tail -n 3 /tmp/kill2.log
wait $tests; grep -E "passed|failed|FAILED|Error|exit" "$OUT/gpu_tests.log" | tail -n 12
