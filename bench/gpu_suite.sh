#!/usr/bin/env bash
# The full-size benchmark suite behind bench/RESULTS.md: SDXL base 1.0 architecture, random weights,
# rank 16 on to_q,to_k,to_v,to_out.0, fp16 + GradScaler, allocator capped at 15 GiB (a T4's usable memory).
# Eager (train.compile = off): the compiled and CUDA-graph rows are in bench/compile_suite.sh.
# Run on the device machine from the repository root: bash bench/gpu_suite.sh   (results: $OUT/*.json)
set -uo pipefail
OUT="${OUT:-bench/out}"; mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
bench() {  # name, flags…
  local name=$1; shift
  echo "== $name: relay bench $*"
  python3 -m runner bench --vram-gib 15 --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" || { echo "FAILED $name"; tail -n 5 "$OUT/$name.err"; }
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('step_s_median','peak_allocated_gib','peak_reserved_gib','gradient_checkpointing','micro_batch','floor_step_s','overhead_vs_floor_pct','achieved_tflops','resume_to_first_step_s')})" "$OUT/$name.json" 2>/dev/null
}
bench b1_1024_auto --resolution 1024 --compile off --steps 10
bench b1_1024_ckpt --resolution 1024 --compile off --checkpointing on --steps 10 --skip-resume
bench b1_1024_8bit --resolution 1024 --compile off --optimizer adamw8bit --steps 10 --skip-resume
bench b1_512_auto --resolution 512 --compile off --steps 10 --skip-resume
bench b4_1024_auto --resolution 1024 --compile off --batch-size 4 --steps 6 --skip-resume
