# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VP_HOME ?= $(CURDIR)/.vp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pytest-xdist workers for `make test` (each takes whole test files; 2 suits 2 cores).
TEST_WORKERS ?= 2

.PHONY: install demo test dev bench bench-scale bench-peers bench-scale-out soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build: otherwise sentence-transformers pulls a multi-GB CUDA build.
$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/vector-platform demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 vector_platform_tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

dev: install
	$(BIN)/vector-platform dev

bench: install
	$(BIN)/python bench/ingest.py

# 100k then 1M chunks through the real assets (about half an hour on 2 cores).
bench-scale: install
	$(BIN)/python bench/scale.py

# LlamaIndex, LangChain and pgai side by side with the platform on the same data and server;
# the peers live in a venv of their own (bench/.venv-peers), never in the product's.
bench-peers: install
	$(BIN)/python bench/peers.py

bench-scale-out: install
	$(BIN)/python bench/scale_out.py

# The reliability suite's soak for 10 minutes instead of the test run's minute.
soak: install
	VP_SOAK_SECONDS=$${VP_SOAK_SECONDS:-600} $(BIN)/python -m pytest -q -s vector_platform_tests/reliability/test_soak.py

# Stop the embedded server before deleting the folder it runs from.
clean:
	if [ -x $(BIN)/vector-platform ]; then $(BIN)/vector-platform db stop; fi
	rm -rf $(VENV) .vp
