#!/usr/bin/env bash
# Issue 16's field case under the T4 emulation: a mixed-aspect image folder on a full-size SDXL, the real
# `relay train` path, and single-shape rows to compare with. Run on the device machine from the repository
# root, with the emulation script carried in the git-ignored .t4/ (a copy of shared/tools/t4-emulate.sh):
#   bash bench/t4_field.sh field    (≤ 10 min) random-weights SDXL folder + 36 images in six aspect ratios, then
#                                   session 1: relay train at 1024 px, micro-batch 1, 32 steps, fresh compile caches;
#                                   session 2: a fresh process on the same run (target 36), empty inductor/Triton
#                                   folders, cache and compile artifacts from the run storage: start → first step
#   bash bench/t4_field.sh single   (≤ 10 min; after field, whose compile folders it reuses) relay bench, one shape: 512 and 1024 px, default plan and checkpointing on
# Results: $OUT/field_session1.json, field_session2.json (bench/t4_field.py train), single_*.json (relay bench --json).
# Large files (model folder, run storage, caches) stay under $WORK, never in $OUT.
set -uo pipefail
PART="${1:-field}"
source bench/lib.sh
EMU=.t4/t4-emulate.sh
[[ -f $EMU ]] || { echo "t4_field: $EMU missing (copy shared/tools/t4-emulate.sh there and carry .t4)"; exit 2; }
WORK="${WORK:-/tmp/t4field}"; mkdir -p "$WORK"

relay_train() {  # name, steps, inductor folder suffix, timeout: relay train on the field run, recorded by bench/t4_field.py
  local name=$1 steps=$2 fresh=$3 limit=$4; local t0=$SECONDS
  echo "== $name: relay train to step $steps (T4 emulation)"
  TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$fresh" TRITON_CACHE_DIR="$WORK/triton-$fresh" \
    timeout "$limit" bash "$EMU" python3 bench/t4_field.py train "$OUT/$name.json" -- \
    train --profile sdxl-naruto-t4 --run field --storage "$WORK/store" --workdir "$WORK/work-$fresh" --plain --hours 1 \
    --set "model.base=\"$WORK/model\"" --set 'model.vae=""' --set "data.source=\"$WORK/images\"" \
    --set data.validation_count=0 --set data.flip=false --set train.batch_size=1 --set train.grad_accum=1 \
    --set train.warmup_steps=0 --set "train.steps=$steps" --set checkpoint.every_min=2 \
    --set 'sample.prompts=["an orange shape"]' --set sample.inference_steps=2 \
    >"$OUT/$name.log" 2>&1
  echo "   exit $? ($((SECONDS - t0)) s wall)"; grep -E "^t4_field|error" "$OUT/$name.log" | tail -n 3
}

if [[ $PART == field ]]; then
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
