#!/usr/bin/env bash
# Mutation testing (docs/testing.md); not part of `make test` (it runs the tests hundreds of
# times). Survivors are blind spots of the suite, or equivalent mutants: docs/testing.md lists
# the ones accepted and why.
#
#   bash scripts/mutants.sh [all|rust|python] [--budget-min N] [--seed S]
#
# rust:   cargo-mutants over the crate's computing modules (adam, cpu, memory, offload,
#         pipeline), with `cargo test --release`, kernels not built (HORIZON_NO_KERNELS); then
#         the mutants cargo test missed, each built into the Python module, against the pytest
#         files that exercise that module through the bindings (scripts/mutants.py
#         --rust-recheck): a survivor of both is a real one. The bindings (rust/python) and the
#         CUDA driver wrapper are not mutated (their tests are pytest's and the GPU's).
#         cargo-mutants is installed when missing. Results: mutants.out/rust/ and
#         mutants.out/rust-pytest.jsonl. Each of the two phases gets the budget.
# python: scripts/mutants.py over the engine, data, optimizer and MoE modules (one-token
#         mutants, a seeded sample that fits the budget). Results: mutants.out/python.jsonl.
#
# Each part stops starting mutants at its budget (default 30 minutes each, sized for a
# 2-core machine) and prints what it found.
set -euo pipefail
cd "$(dirname "$0")/.."
what=all
budget=30
seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    all|rust|python) what=$1 ;;
    --budget-min) budget=${2:?--budget-min needs a number}; shift ;;
    --seed) seed=${2:?--seed needs a number}; shift ;;
    *) echo "mutants.sh: unknown argument '$1' (all|rust|python, --budget-min N, --seed S)" >&2; exit 2 ;;
  esac
  shift
done
case "$budget" in ''|*[!0-9]*|0) echo "mutants.sh: --budget-min must be a positive whole number of minutes, got '$budget'" >&2; exit 2 ;; esac
py=${PYTHON:-.venv/bin/python}
mkdir -p mutants.out

if [ "$what" != python ]; then
  if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: installing cargo-mutants (cargo install --locked cargo-mutants; a few minutes)"
    cargo install --locked cargo-mutants
  fi
  files=()
  for d in adam cpu memory offload pipeline; do files+=(-f "rust/$d/*.rs"); done
  echo "== rust: cargo mutants, ${budget} min"
  # SIGINT at the budget: cargo-mutants stops, keeping the outcomes so far in mutants.out/.
  HORIZON_NO_KERNELS=1 timeout -s INT "$((budget * 60))" \
    cargo mutants "${files[@]}" -e 'rust/*/roof.rs' -e 'rust/*/tests.rs' \
      --profile release --minimum-test-timeout 60 --shuffle --output mutants.out/rust || true
  out=mutants.out/rust/mutants.out
  for k in caught missed timeout unviable; do
    printf '%s: %s\n' "$k" "$( [ -f "$out/$k.txt" ] && wc -l <"$out/$k.txt" || echo 0)"
  done
  if [ -s "$out/missed.txt" ]; then echo "missed by cargo test:"; sed 's/^/  /' "$out/missed.txt"; fi
  # Much of the crate is tested from Python through the bindings (the disk tier, the arena,
  # the pipeline): each missed mutant, built into the module, against those pytest files.
  echo "== rust: the missed mutants against the Python tests, ${budget} min"
  rm -f mutants.out/rust-pytest.jsonl
  "$py" scripts/mutants.py --rust-recheck "$out" --budget-min "$budget" --out mutants.out/rust-pytest.jsonl
fi

if [ "$what" != rust ]; then
  echo "== python: scripts/mutants.py, ${budget} min"
  rm -f mutants.out/python.jsonl
  "$py" scripts/mutants.py --budget-min "$budget" --seed "$seed" --out mutants.out/python.jsonl
fi
