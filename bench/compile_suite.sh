#!/usr/bin/env bash
# Regional torch.compile against eager on the full-size SDXL LoRA step (issue 8's 1024 px batch-1 target).
# Run on the device machine from the repository root: bash bench/compile_suite.sh [PART]   (results: $OUT/*.json)
# PART a: 1024 px batch 1, checkpointing on (eager, blocks compiled) and off (blocks compiled);
# PART b: 1024 px batch 1, CUDA graphs, checkpointing on and auto, then the GPU tests of graphs;
# PART c: with MODE (default graphs): 1024 px batch 1 (checkpointing on, and auto), batch 4, 512 px; GPU tests.
set -uo pipefail
OUT="${OUT:-bench/out}"; mkdir -p "$OUT"
PART="${1:-a}"; MODE="${2:-graphs}"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
bench() {  # name, flags…
  local name=$1; shift
  echo "== $name: relay bench $*"
  local t0=$SECONDS
  timeout "${BENCH_TIMEOUT:-600}" python3 -m runner bench --vram-gib 15 --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" || { echo "FAILED $name"; tail -n 5 "$OUT/$name.err"; }
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('step_s_median','peak_allocated_gib','peak_reserved_gib','gradient_checkpointing','micro_batch','compiled','setup_s','first_step_s','floor_step_s','overhead_vs_floor_pct','achieved_tflops','checkpoint_save_s','resume_to_first_step_s','notes')})" "$OUT/$name.json" 2>/dev/null
  echo "   ($((SECONDS - t0)) s wall)"
}
if [[ $PART == a ]]; then
  bench c_b1_1024_ckpt_eager --resolution 1024 --checkpointing on --compile off --steps 10 --skip-resume
  bench c_b1_1024_ckpt_compiled --resolution 1024 --checkpointing on --compile blocks --steps 10 --skip-resume
  bench c_b1_1024_auto_compiled --resolution 1024 --compile blocks --steps 10 --skip-resume
elif [[ $PART == b ]]; then
  bench c_b1_1024_ckpt_graphs --resolution 1024 --checkpointing on --compile graphs --steps 10 --skip-resume
  bench c_b1_1024_auto_graphs --resolution 1024 --compile graphs --steps 10 --skip-resume
  python3 -m pytest -q -m gpu tests/gpu/test_graphs_gpu.py 2>&1 | tail -n 15
else
  bench "c_b1_1024_ckpt_$MODE" --resolution 1024 --checkpointing on --compile "$MODE" --steps 10 --skip-resume
  bench "c_b1_1024_auto_$MODE" --resolution 1024 --compile "$MODE" --steps 10
  bench "c_b4_1024_$MODE" --resolution 1024 --batch-size 4 --compile "$MODE" --steps 6 --skip-resume
  bench "c_b1_512_$MODE" --resolution 512 --compile "$MODE" --steps 10 --skip-resume
  python3 -m pytest -q -s -m gpu tests/gpu -p no:cacheprovider 2>&1 | grep -E "SDXL LoRA|GPU resume|passed|failed|FAILED|Error|assert" | tail -n 30
fi
