#!/usr/bin/env bash
# The T4 step under the faithful emulation (flash attention off, as on a T4): profile, candidates, the
# graphs-vs-compiled correctness measurement, the rows of bench/RESULTS.md. One part per device call:
#   bash bench/t4_suite.sh 1   candidates (bench/t4_candidates.py), the 1024 px profile (bench/profile_step.py),
#                              then bench/graphs_divergence.py on the whole GPU (not emulated)
#   bash bench/t4_suite.sh 2   the step with channels-last convolutions at 1024 and 512 px (profile_step.py), and
#                              the compiled-blocks vs graphs spread (graphs_divergence.py, compiled modes)
#   bash bench/t4_suite.sh 3   relay bench rows (1024/512 px, checkpointing, text encoders), flash off, and the
#                              1024 px row with T4_NO_FLASH=0 beside it (ROWS="…" picks some); the compile runs on
#                              16 cores (BENCH_CORES; replayed graphs do not depend on the CPU, first_step_s does)
# On the device: carry [".t4"] (t4-emulate.sh and t4-site/); results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PART="${1:-1}"
source bench/lib.sh
EMU=.t4/t4-emulate.sh
[[ -f $EMU ]] || { echo "t4_suite: $EMU missing (carry .t4)"; exit 2; }
export TORCHINDUCTOR_CACHE_DIR=/tmp/t4suite-inductor TRITON_CACHE_DIR=/tmp/t4suite-triton
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
if [[ $PART == 1 ]]; then
  echo "== candidates (T4 emulation)"; t0=$SECONDS
  timeout 120 bash $EMU python3 bench/t4_candidates.py 2>&1 | tee "$OUT/candidates.txt"
  echo "   ($((SECONDS - t0)) s)"
  echo "== profile 1024 px (T4 emulation, flash off; 8 cores for the compile)"; t0=$SECONDS
  T4_CORES=0-7 timeout 330 bash $EMU python3 bench/profile_step.py --resolution 1024 --steps 6 \
    --json "$OUT/profile_1024.json" >"$OUT/profile_1024.log" 2>&1; echo "   exit $? ($((SECONDS - t0)) s)"
  grep -v "^ \|^\[\|^{\|^}\|^\]" "$OUT/profile_1024.log" | grep -v Warning | tail -n 30
  echo "== graphs divergence (whole GPU, tiny model)"; t0=$SECONDS
  timeout $((560 - SECONDS)) python3 bench/graphs_divergence.py --json "$OUT/divergence.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/divergence.txt"
  echo "   ($((SECONDS - t0)) s)"
fi
if [[ $PART == 2 ]]; then  # channels-last (the change), the compiled-vs-graphs spread, 512 px
  prof() { local name=$1 limit=$2; shift 2; echo "== $name: profile_step $* (T4 emulation, 16 cores for the compile)"; local t0=$SECONDS
    T4_CORES=0-15 timeout "$limit" bash $EMU python3 bench/profile_step.py --no-eager-profile --json "$OUT/$name.json" "$@" \
      >"$OUT/$name.log" 2>&1; echo "   exit $? ($((SECONDS - t0)) s)"
    grep -v "^ \|^\[\|^{\|^}\|^\]" "$OUT/$name.log" | grep -v -i "warn\|should be kept" | tail -n 12; }
  [[ ${BASELINE:-0} == 1 ]] && prof base_1024 ${PROF_S:-200} --resolution 1024 --steps 6 --channels-last off  # another card than part 1's
  prof cl_1024 ${PROF_S:-200} --resolution 1024 --steps 6 --channels-last on
  echo "== compiled divergence (whole GPU, tiny model)"; t0=$SECONDS
  T=${TOTAL:-575}; timeout $((T - 15 - SECONDS < 160 ? T - 15 - SECONDS : 160)) python3 bench/graphs_divergence.py --precisions "" --layouts text-encoders,convs-ff --compiled-seeds 0 \
    --json "$OUT/divergence_compiled.json" 2>&1 | grep -v -i "warn\|should be kept" | tee "$OUT/divergence_compiled.txt"
  echo "   ($((SECONDS - t0)) s)"
  (( SECONDS < T - 95 )) && prof cl_512 $((T - SECONDS)) --resolution 512 --steps 6 --channels-last on
fi
if [[ $PART == 3 ]]; then  # relay bench rows, flash off, and the 1024 px row with T4_NO_FLASH=0 beside it
  t4() { local name=$1; shift; echo "== $name: relay bench $* (T4 emulation${FLASH:+, T4_NO_FLASH=$FLASH})"; local t0=$SECONDS
    T4_CORES=${BENCH_CORES:-0-15} T4_NO_FLASH=${FLASH:-1} timeout "${BENCH_TIMEOUT:-150}" bash $EMU python3 -m runner bench --vram-gib 15 --json --skip-resume "$@" \
      >"$OUT/$name.json" 2>"$OUT/$name.err" || { echo "FAILED $name"; tail -n 3 "$OUT/$name.err"; }
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','peak_allocated_gib','peak_reserved_gib','gradient_checkpointing','compiled','first_step_s','floor_step_s','step_tflop','notes')})" "$OUT/$name.json" 2>/dev/null
    echo "   ($((SECONDS - t0)) s wall)"; }
  for n in ${ROWS:-t4_1024 t4_1024_flash t4_512 t4_1024_ckpt t4_1024_te}; do
    (( SECONDS + ${BENCH_TIMEOUT:-150} > ${TOTAL:-590} )) && { echo "== $n: left out (the call's limit, TOTAL=${TOTAL:-590} s)"; continue; }
    case $n in
      t4_1024) t4 $n --resolution 1024 --steps 8 ;;
      t4_1024_flash) FLASH=0 t4 $n --resolution 1024 --steps 8 ;;
      t4_512) t4 $n --resolution 512 --steps 8 ;;
      t4_512_ckpt) t4 $n --resolution 512 --steps 8 --checkpointing on ;;
      t4_1024_ckpt) t4 $n --resolution 1024 --steps 8 --checkpointing on ;;
      t4_1024_te) t4 $n --resolution 1024 --steps 8 --text-encoder ;;
    esac
  done
fi
