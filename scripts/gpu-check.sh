#!/usr/bin/env bash
# GPU verification inside the device time an issue gets (15 minutes in all, the machine's cold
# start included): one full call under 420 s, and room for a quick re-run (under 240 s).
#
#   bash scripts/gpu-check.sh prepare          # here: build the abi3 wheel into .gpu/
#   bash scripts/gpu-check.sh run  [--dry-run] # there: install, pytest -m gpu, all benchmarks
#   bash scripts/gpu-check.sh quick [--dry-run] # there: install, pytest -m gpu, ceilings, one engine figure
#
# --dry-run prints the plan and its budgets and checks them (and the prepared wheel) without a
# GPU. On the device machine (the device tool's run):
#   PYTHONUNBUFFERED=1 bash scripts/gpu-check.sh run 2>&1 | tee $OUT/log        (timeout_s 450)
# Every step runs under its own time limit and is skipped when the call's budget cannot hold it;
# tests have a per-test limit (a hanging kernel costs its test); benchmarks append each figure
# to their JSON Lines file as they measure it. At most 8 files land in $OUT (the device tool
# brings back 8): log, doctor.json, gpu-tests.jsonl, and one .jsonl per benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
py=${PYTHON:-python3}

# ---------------------------------------------------------------- the plan (seconds)
# step: budget  (the sum stays under the call's limit; measured against the issue's 15 min:
# cold start ~2 min + full 420 s + quick 240 s + idle/transfer)
FULL_LIMIT=420
QUICK_LIMIT=240
PER_TEST=60          # one test (pytest-timeout when the image has it, else our watchdog)
declare -A BUDGET=(
  [install]=20 [info]=10 [tests]=150
  [gpu_ceilings]=25 [gpu_kernels]=60 [gpu_moe]=80 [gpu_engine]=60
  [quick_tests]=140 [quick_ceilings]=20 [quick_engine]=45
)
FULL_STEPS=(install info tests gpu_ceilings gpu_kernels gpu_moe gpu_engine)
QUICK_STEPS=(install info quick_tests quick_ceilings quick_engine)
# Benchmark arguments sized to their budgets.
declare -A ARGS=(
  [gpu_ceilings]="" [gpu_kernels]="--compile-budget 20" [gpu_moe]="--quick"
  [gpu_engine]="--max-params 1.5e9 --steps 2" [quick_ceilings]="" [quick_engine]="--quick --steps 2"
)
declare -A BENCH=([gpu_ceilings]=gpu_ceilings [gpu_kernels]=gpu_kernels [gpu_moe]=gpu_moe [gpu_engine]=gpu_engine
                  [quick_ceilings]=gpu_ceilings [quick_engine]=gpu_engine)

plan() {  # mode -> prints the plan, returns 1 when the budgets do not fit
  local limit steps total=0
  if [ "$1" = quick ]; then limit=$QUICK_LIMIT; steps=("${QUICK_STEPS[@]}"); else limit=$FULL_LIMIT; steps=("${FULL_STEPS[@]}"); fi
  echo "gpu-check $1: plan (seconds; each step under its own limit)"
  for s in "${steps[@]}"; do
    total=$((total + BUDGET[$s]))
    printf '  %-15s %4d   %s\n' "$s" "${BUDGET[$s]}" "$(describe "$s")"
  done
  printf '  %-15s %4d   (limit %d; per test %d s)\n' total "$total" "$limit" "$PER_TEST"
  if [ "$total" -gt "$limit" ]; then echo "gpu-check: the plan ($total s) exceeds its limit ($limit s)"; return 1; fi
  local whl
  whl=$(ls .gpu/*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    echo "  carried: $(du -ch .gpu | tail -1 | cut -f1) in .gpu/ ($(basename "$whl"))"
  else
    echo "  carried: nothing prepared yet (bash scripts/gpu-check.sh prepare)"
  fi
  echo "  device tool: run(command=\"PYTHONUNBUFFERED=1 bash scripts/gpu-check.sh $1 2>&1 | tee \$OUT/log\", carry=[\".gpu\"], timeout_s=$((limit + 30)))"
  return 0
}

describe() {
  case $1 in
    install) echo "pip install the wheel from .gpu/ (--no-deps --no-index); report missing imports" ;;
    info) echo "nvidia-smi, horizon doctor --json" ;;
    tests|quick_tests) echo "pytest -m gpu via scripts/gpu_tests.py (budget ${BUDGET[$1]} s, $PER_TEST s per test)" ;;
    *) echo "benches/${BENCH[$1]}.py ${ARGS[$1]}" ;;
  esac
}

# ---------------------------------------------------------------- prepare (here)
if [ "$mode" = prepare ]; then
  set -e
  # The abi3 wheel with the kernels embedded (maturin tags it manylinux_2_X from the glibc
  # symbols the module uses; scripts/wheel_glibc.py checks that below). `make wheel` sets up
  # .venv first when no Python with maturin is at hand.
  builder=""
  for cand in .venv/bin/python "${PYTHON:-}"; do
    if [ -n "$cand" ] && "$cand" -m maturin --version >/dev/null 2>&1; then builder=$cand; break; fi
  done
  if [ -n "$builder" ]; then
    PATH="$(dirname "$builder"):$PATH" "$builder" -m maturin build --release --out dist
  else
    make wheel
  fi
  rm -rf .gpu && mkdir -p .gpu
  whl=$(ls -t dist/horizon_train-*abi3*.whl | head -1)
  cp "$whl" .gpu/
  # The GPU image already has torch, numpy, pytest, pytest-timeout, transformers, tokenizers,
  # safetensors and matplotlib (.library/device/KINDS.md): nothing else is carried.
  $py scripts/wheel_glibc.py .gpu/"$(basename "$whl")"
  du -sh .gpu
  plan run
  plan quick
  exit 0
fi

if [ "$mode" != run ] && [ "$mode" != quick ]; then
  echo "usage: bash scripts/gpu-check.sh prepare | run [--dry-run] | quick [--dry-run]" >&2
  exit 2
fi
if [ "$dry" = 1 ]; then
  plan "$mode"
  exit $?
fi

# ---------------------------------------------------------------- run / quick (there)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
plan "$mode" || exit 2
if [ "$mode" = quick ]; then limit=$QUICK_LIMIT; steps=("${QUICK_STEPS[@]}"); else limit=$FULL_LIMIT; steps=("${FULL_STEPS[@]}"); fi
start=$SECONDS
summary=()
rc=0

fits() {  # step -> true when its budget still fits the call's limit
  local left=$((limit - (SECONDS - start)))
  if [ "${BUDGET[$1]}" -gt "$left" ]; then
    summary+=("$1: skipped (budget ${BUDGET[$1]} s, $left s left)")
    return 1
  fi
}

run_step() {  # step
  local s=$1 t0=$SECONDS code=0
  fits "$s" || return 0
  echo "== $s (budget ${BUDGET[$s]} s, at $((SECONDS - start)) s)"
  case $s in
    install)
      $py - <<'PY'
import importlib.util
need = ["torch", "numpy", "pytest", "safetensors", "tokenizers", "matplotlib", "transformers"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("imports missing on this image:", ", ".join(missing) or "none",
      "| pytest-timeout:", "yes" if importlib.util.find_spec("pytest_timeout") else "no (the driver's watchdog)")
PY
      # The wheel's glibc against this image's, before pip (which refuses a wheel whose
      # manylinux tag this system does not meet with a terse message).
      if $py scripts/wheel_glibc.py --host .gpu/*.whl; then
        timeout "${BUDGET[$s]}" $py -m pip install -q --no-deps --no-index --force-reinstall .gpu/*.whl || code=$?
      else
        code=3
      fi
      ;;
    info)
      timeout 5 nvidia-smi 2>&1 | head -15
      timeout "$((BUDGET[$s] - 5))" $py -m horizon doctor --json > "$OUT/doctor.json" 2>&1 || code=$?
      ;;
    tests|quick_tests)
      # From the repository root: the src/ layout keeps the source tree off sys.path, so the
      # tests import the installed wheel.
      timeout --kill-after=5 "${BUDGET[$s]}" $py scripts/gpu_tests.py --budget "$((BUDGET[$s] - 10))" \
        --per-test "$PER_TEST" --skips-fail --results "$OUT/gpu-tests.jsonl" -- -m gpu tests || code=$?
      ;;
    *)
      # shellcheck disable=SC2086
      timeout --kill-after=5 "${BUDGET[$s]}" $py "benches/${BENCH[$s]}.py" --out "$OUT/${BENCH[$s]}.jsonl" ${ARGS[$s]} \
        || code=$?
      ;;
  esac
  local took=$((SECONDS - t0))
  if [ "$code" = 0 ]; then
    summary+=("$s: ok in $took s")
  else
    summary+=("$s: exit $code after $took s$([ "$code" = 124 ] && echo ' (its time limit; figures so far kept)')")
    [ "$s" = tests ] || [ "$s" = quick_tests ] || [ "$s" = install ] && rc=1
  fi
}

for s in "${steps[@]}"; do run_step "$s"; done

echo "== summary ($mode, $((SECONDS - start)) s of $limit, $(date -u +%FT%TZ))"
for line in "${summary[@]}"; do echo "  $line"; done
for f in "$OUT"/gpu_*.jsonl; do
  [ -f "$f" ] || continue
  echo "-- $(basename "$f"): $(wc -l < "$f") rows"; tail -4 "$f" | cut -c1-300
done
echo "gpu-check done (rc=$rc); logs and JSON Lines in $OUT"
exit $rc
