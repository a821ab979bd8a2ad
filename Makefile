# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/demo.py

# one pytest worker per core (at most 4: each holds real models and compiled kernels)
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4

test: $(STAMP)
	$(PYTEST) tests

test-all: $(STAMP)
	$(PYTEST) --runslow tests

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[peers]"
	TVM_NUM_THREADS=$$(nproc) $(PY) benchmarks/fidelity.py --tvm-target native
	$(PY) benchmarks/speed.py --threads $$(nproc)
	$(PY) benchmarks/subbyte.py --threads $$(nproc)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
