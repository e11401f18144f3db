#!/usr/bin/env bash
# T4 emulation, single-shape rows of bench/RESULTS.md: `relay bench` (full-size SDXL, random weights, the real
# training path) at 512 and 1024 px, micro-batch 1, with the default plan and with gradient checkpointing forced on,
# each under ../shared/tools/t4-emulate.sh (8 of the H200's SMs, 15 GiB, 2 CPU cores).
# On the device: carry [".whl", ".t4"]; run `bash bench/t4_single_shape.sh [names…]`. Results: $OUT/t4_*.json.
cd "$(dirname "$0")/.." || exit 1
source bench/lib.sh
export BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
t4() { local name=$1; shift; echo "== $name"; local t0=$SECONDS
  timeout "$BENCH_TIMEOUT" bash .t4/t4-emulate.sh python3 -m runner bench --json --skip-resume "$@" \
    >"$OUT/$name.json" 2>"$OUT/$name.err" || { echo "FAILED $name"; tail -n 5 "$OUT/$name.err"; }
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','peak_allocated_gib','peak_reserved_gib','gradient_checkpointing','micro_batch','compiled','setup_s','first_step_s','checkpoint_save_s','notes')})" "$OUT/$name.json" 2>/dev/null
  echo "   ($((SECONDS - t0)) s wall)"; }
ALL=(t4_1024_auto t4_1024_ckpt t4_512_auto t4_512_ckpt)
for n in "${@:-${ALL[@]}}"; do
  case $n in
    t4_1024_auto) t4 $n --resolution 1024 --steps 10 ;;
    t4_1024_ckpt) t4 $n --resolution 1024 --steps 10 --checkpointing on ;;
    t4_512_auto)  t4 $n --resolution 512 --steps 10 ;;
    t4_512_ckpt)  t4 $n --resolution 512 --steps 10 --checkpointing on ;;
  esac
done
