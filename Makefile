# The README's two commands: `make train` and `make test`. Each creates (or reuses) the
# virtual environment in .venv, installs what it needs, and builds the native module.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: train test setup build cargo-test pytest bench bench-peers mutants wheel clean

train: build
	$(VENV)/bin/horizon train $(ARGS)

test: build cargo-test pytest

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

build: setup
	$(PY) -m maturin develop --release --quiet

cargo-test: setup
	cargo test --release
	cargo test --release --features roof

pytest: build
	HORIZON_REQUIRE_KERNELS=1 $(PY) -m pytest -q

# The README's AdamW table: every row (the roof rows need the module built with `roof`; the
# DeepSpeed rows need `make bench-peers` once, else the bench says it skipped them).
bench: setup
	cargo bench --features roof
	$(PY) -m maturin develop --release --quiet --features python,pyo3/extension-module,roof
	$(PY) benches/adam_vs_peers.py
	$(PY) -m maturin develop --release --quiet

bench-peers: setup
	$(PY) -m pip install -r requirements-peers.txt

# Mutation testing (docs/testing.md); not part of `make test`. ARGS: all|rust|python, --budget-min N.
mutants: build
	bash scripts/mutants.sh $(ARGS)

wheel: setup
	$(PY) -m maturin build --release --out dist

clean:
	rm -rf target dist $(VENV)
