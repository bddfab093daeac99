# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# CPU build of torch from local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: setup demo test test-fast bench
setup: $(VENV)/.installed

demo: setup
	$(BIN)/plait demo

# --dist loadfile: a file's tests share module-scoped fixtures (one process spawn runs every
# layout of a parity file); spread over both workers, each worker ran that spawn again.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not tier2"

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done
