#!/usr/bin/env bash
# GPU verification in one call (see README, developer notes).
#   bash scripts/gpu-check.sh prepare   # here: build the abi3 wheel into .gpu/
#   bash scripts/gpu-check.sh run       # on the GPU machine: install, pytest -m gpu, benches
# Logs and results go under $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

if [ "$mode" = prepare ]; then
  # The GPU machine has torch, numpy and pytest but no network: bring our wheel and the
  # pure-Python / abi3 wheels the tests import (for its CPython 3.12), within the 64 MiB
  # the device tool carries.
  set -e
  make wheel
  rm -rf .gpu && mkdir -p .gpu/deps
  cp dist/horizon_train-*abi3*.whl .gpu/
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/deps transformers safetensors tokenizers matplotlib
  rm -f .gpu/deps/numpy-*.whl .gpu/deps/hf_xet-*.whl   # present there / not needed offline
  du -sh .gpu
  exit 0
fi

py=${PYTHON:-python3}
# Dependencies first (only those missing), then our wheel; never the network.
for w in .gpu/deps/*.whl; do
  [ -f "$w" ] || continue
  name=$(basename "$w" | cut -d- -f1)
  $py -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null \
    || $py -m pip install -q --no-deps --no-index "$w" 2>&1 | tail -1
done
$py -m pip install --no-deps --no-index --force-reinstall .gpu/*.whl 2>&1 | tail -2
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
$py -m horizon doctor --json > "$OUT/doctor.json" 2>&1 || true
# Run the tests against the installed wheel, not the source tree.
rc=0
# Budgets keep the whole call inside the device tool's 10 minutes (about 560 s in all).
# From the repository root: the src/ layout keeps the source tree off sys.path, so the tests
# import the installed wheel.
timeout "${PYTEST_BUDGET:-200}" $py -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/pytest-gpu.log" 2>&1 || rc=1
tail -25 "$OUT/pytest-gpu.log"
bench() {  # name, budget seconds, extra args
  local name=$1 budget=$2; shift 2
  timeout "$budget" $py "benches/$name.py" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
    || echo "$name: exit $? (see $name.log)" | tee -a "$OUT/summary.txt"
}
bench gpu_ceilings 45
bench gpu_kernels 75
bench gpu_moe 120
bench gpu_engine 120
echo "== summary ($(date -u +%FT%TZ))"
for f in "$OUT"/gpu_*.log; do echo "-- $(basename "$f")"; tail -12 "$f"; done
echo "gpu-check done (pytest rc=$rc); logs and JSON in $OUT"
exit $rc
