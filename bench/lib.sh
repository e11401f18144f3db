# Shared by the device suites (source it from the repository root): the carried wheels, the device line,
# and bench NAME FLAGS… — one capped `relay bench --json` run into $OUT/NAME.json with its key figures echoed.
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
  local t0=$SECONDS
  timeout "${BENCH_TIMEOUT:-600}" python3 -m runner bench --vram-gib 15 --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" || { echo "FAILED $name"; tail -n 5 "$OUT/$name.err"; }
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('step_s_median','peak_allocated_gib','peak_reserved_gib','gradient_checkpointing','micro_batch','compiled','setup_s','first_step_s','floor_step_s','overhead_vs_floor_pct','achieved_tflops','checkpoint_save_s','checkpoint_write_s','resume_to_first_step_s','notes')})" "$OUT/$name.json" 2>/dev/null
  echo "   ($((SECONDS - t0)) s wall)"
}
