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
  set -e
  make wheel
  rm -rf .gpu && mkdir -p .gpu
  cp dist/horizon_train-*abi3*.whl .gpu/
  ls -l .gpu
  exit 0
fi

py=${PYTHON:-python3}
$py -m pip install --no-deps --no-index --force-reinstall .gpu/*.whl 2>&1 | tail -2
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
$py -m horizon doctor --json > "$OUT/doctor.json" 2>&1 || true
# Run the tests against the installed wheel, not the source tree.
rc=0
( cd tests && $py -m pytest -m gpu -q -p no:cacheprovider --rootdir=.. -c ../pyproject.toml . ) \
  2>&1 | tee "$OUT/pytest-gpu.log" | tail -30 || rc=1
for b in benches/gpu_*.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 300 $py "$b" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | tail -20
done
echo "gpu-check done; logs in $OUT"
exit $rc
