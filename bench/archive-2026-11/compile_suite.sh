#!/usr/bin/env bash
# Regional torch.compile against eager on the full-size SDXL LoRA step (issue 8's 1024 px batch-1 target).
# Run on the device machine from the repository root: bash bench/archive-2026-11/compile_suite.sh [PART]   (results: $OUT/*.json)
# PART a: 1024 px batch 1, checkpointing on (eager, blocks compiled) and off (blocks compiled);
# PART b: 1024 px batch 1, CUDA graphs, checkpointing on and auto, then the GPU tests of graphs;
# PART c: with MODE (default graphs): 1024 px batch 1 (checkpointing on, and auto), batch 4, 512 px; GPU tests.
set -uo pipefail
PART="${1:-a}"; MODE="${2:-graphs}"
source bench/lib.sh
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
