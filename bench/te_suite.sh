#!/usr/bin/env bash
# Text-encoder LoRA and LoRA on more UNet layers (issues 17 and 16), full-size SDXL with random weights, 1024 px,
# micro-batch 1, rank 16, fp16 + GradScaler, the default fast path (train.compile = auto: CUDA graphs of compiled
# blocks), allocator capped at 15 GiB. Under the T4 emulation, one part per call (each stays under 10 minutes):
#   bash .t4/t4-emulate.sh bash bench/te_suite.sh a     # UNet only vs both text encoders too
#   bash .t4/t4-emulate.sh bash bench/te_suite.sh b     # 8-bit encoders; many UNet layers; encoders + checkpointing
#   bash bench/te_suite.sh c                            # the GPU tests (tiny model): encoders inside the graph, 8-bit
# Results: $OUT/*.json (step_s_median, peak_allocated_gib, peak_reserved_gib, gradient_checkpointing, compiled).
set -uo pipefail
source bench/lib.sh
MANY=to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,proj_in,proj_out,ff.net.0.proj,ff.net.2,time_emb_proj
case "${1:-a}" in
  a)
    bench te_off_1024 --resolution 1024 --steps 10 --skip-resume
    bench te_on_1024 --resolution 1024 --steps 10 --skip-resume --text-encoder
    ;;
  b)
    bench te_8bit_1024 --resolution 1024 --steps 10 --skip-resume --text-encoder-8bit
    bench many_layers_1024 --resolution 1024 --steps 10 --skip-resume --targets "$MANY"
    bench te_on_ckpt_1024 --resolution 1024 --steps 10 --skip-resume --text-encoder --checkpointing on
    ;;
  c)
    python3 -m pytest -q -m gpu tests/gpu/test_text_encoder_gpu.py -p no:cacheprovider 2>&1 | tail -n 20
    ;;
  *) echo "usage: bash bench/te_suite.sh a|b|c" >&2; exit 2 ;;
esac
