#!/usr/bin/env bash
# Issue 16's field case under the T4 emulation: a mixed-aspect image folder on a full-size SDXL, the real
# `relay train` path, and single-shape rows to compare with. Run on the device machine from the repository
# root, with the emulation script carried in the git-ignored .t4/ (a copy of shared/tools/t4-emulate.sh):
#   bash bench/t4_field.sh field    (≤ 10 min) random-weights SDXL folder + 36 images in six aspect ratios, then
#                                   session 1: relay train at 1024 px, micro-batch 1, 32 steps, fresh compile caches;
#                                   session 2: a fresh process on the same run (target 36), empty inductor/Triton
#                                   folders, cache and compile artifacts from the run storage: start → first step
#   bash bench/t4_field.sh slice    (≤ 10 min, issue 30's whole job) the shipped sdxl-naruto-t4 plan as a user runs it
#                                   (micro-batch 1 × 4, flash attention off) on 48 square 1024 px images: session 1
#                                   with --hours 0.08 (cache build, compile, a checkpoint a minute, a stop at the
#                                   deadline), session 2 a fresh process, empty compile folders, --hours 0.045
#   bash bench/t4_field.sh single   (≤ 10 min; after field, whose compile folders it reuses) relay bench, one shape: 512 and 1024 px, default plan and checkpointing on
# Results: $OUT/field_session1.json, field_session2.json (bench/t4_field.py train), single_*.json (relay bench --json).
# Large files (model folder, run storage, caches) stay under $WORK, never in $OUT.
set -uo pipefail
PART="${1:-field}"
source bench/lib.sh
EMU=.t4/t4-emulate.sh
[[ -f $EMU ]] || { echo "t4_field: $EMU missing (copy shared/tools/t4-emulate.sh there and carry .t4)"; exit 2; }
WORK="${WORK:-/tmp/t4field}"; mkdir -p "$WORK"

relay_train() {  # name, steps, inductor folder suffix, timeout [ARGS…]: relay train on the field run, recorded by bench/t4_field.py
  local name=$1 steps=$2 fresh=$3 limit=$4; shift 4; local t0=$SECONDS
  echo "== $name: relay train to step $steps (T4 emulation)"
  TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$fresh" TRITON_CACHE_DIR="$WORK/triton-$fresh" \
    timeout "$limit" bash "$EMU" python3 bench/t4_field.py train "$OUT/$name.json" -- \
    train --profile sdxl-naruto-t4 --run field --storage "$WORK/store" --workdir "$WORK/work-$fresh" --plain --hours 1 \
    --set "model.base=\"$WORK/model\"" --set 'model.vae=""' --set "data.source=\"$WORK/images\"" \
    --set data.validation_count=0 --set data.flip=false --set train.batch_size=1 --set train.grad_accum=1 \
    --set train.warmup_steps=0 --set "train.steps=$steps" --set checkpoint.every_min=2 \
    --set 'sample.prompts=["an orange shape"]' --set sample.inference_steps=2 "$@" \
    >"$OUT/$name.log" 2>&1
  echo "   exit $? ($((SECONDS - t0)) s wall)"; grep -E "^t4_field|error" "$OUT/$name.log" | tail -n 3
}

if [[ $PART == slice ]]; then
  python3 bench/t4_field.py model "$WORK/model" || exit 1
  python3 bench/t4_field.py images "$WORK/images" 48 1.0 square || exit 1
  rm -rf "$WORK/store" "$WORK"/work-* "$WORK"/inductor-* "$WORK"/triton-*
  # as shipped: micro-batch 1 × 4 accumulation, warm-up 50; a checkpoint a minute, a 30 s margin (3 min shipped)
  slice_args=(--set train.grad_accum=4 --set train.warmup_steps=50 --set checkpoint.every_min=1 --set session.margin_min=0.5)
  H1=${H1:-0.08} H2=${H2:-0.045} T=${TOTAL:-585}  # session lengths in hours; the call's limit in seconds
  relay_train slice_session1 2000 s1 $(python3 -c "print(int($H1 * 3600 + 45))") "${slice_args[@]}" --hours "$H1"
  relay_train slice_session2 2000 s2 $((T - SECONDS)) "${slice_args[@]}" --hours "$H2"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader >>"$OUT/device.txt"
elif [[ $PART == field ]]; then
  python3 bench/t4_field.py model "$WORK/model" || exit 1   # on the whole GPU: random init in seconds
  python3 bench/t4_field.py images "$WORK/images" 36 || exit 1
  rm -rf "$WORK/store" "$WORK"/work-* "$WORK"/inductor-* "$WORK"/triton-*
  relay_train field_session1 32 s1 360
  relay_train field_session2 36 s2 150   # a new VM: empty compile folders, the run's artifacts only
  nvidia-smi --query-gpu=memory.used --format=csv,noheader >>"$OUT/device.txt"
else
  # the field run's compile folders: these rows measure s/step and memory, not compiling
  export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-s1" TRITON_CACHE_DIR="$WORK/triton-s1"
  bench_emulated() {  # as lib.sh's bench, under the emulation
    local name=$1; shift; local t0=$SECONDS
    echo "== $name: relay bench $* (T4 emulation)"
    timeout "${BENCH_TIMEOUT:-140}" bash "$EMU" python3 -m runner bench --vram-gib 15 --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" \
      || { echo "FAILED $name"; tail -n 5 "$OUT/$name.err"; }
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('step_s_median','peak_reserved_gib','gradient_checkpointing','compiled','first_step_s','setup_s','notes')})" "$OUT/$name.json" 2>/dev/null
    echo "   ($((SECONDS - t0)) s wall)"
  }
  bench_emulated single_1024_default --resolution 1024 --steps 10 --skip-resume
  bench_emulated single_1024_ckpt --resolution 1024 --checkpointing on --steps 10 --skip-resume
  bench_emulated single_512_default --resolution 512 --steps 10 --skip-resume
  bench_emulated single_512_ckpt --resolution 512 --checkpointing on --steps 10 --skip-resume
fi
