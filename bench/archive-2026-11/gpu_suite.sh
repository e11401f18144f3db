#!/usr/bin/env bash
# The full-size benchmark suite behind bench/RESULTS.md: SDXL base 1.0 architecture, random weights,
# rank 16 on to_q,to_k,to_v,to_out.0, fp16 + GradScaler, allocator capped at 15 GiB (a T4's usable memory).
# Eager (train.compile = off): the compiled and CUDA-graph rows are in bench/archive-2026-11/compile_suite.sh.
# Run on the device machine from the repository root: bash bench/archive-2026-11/gpu_suite.sh   (results: $OUT/*.json)
set -uo pipefail
source bench/lib.sh
bench b1_1024_auto --resolution 1024 --compile off --steps 10
bench b1_1024_ckpt --resolution 1024 --compile off --checkpointing on --steps 10 --skip-resume
bench b1_1024_8bit --resolution 1024 --compile off --optimizer adamw8bit --steps 10 --skip-resume
bench b1_512_auto --resolution 512 --compile off --steps 10 --skip-resume
bench b4_1024_auto --resolution 1024 --compile off --batch-size 4 --steps 6 --skip-resume
