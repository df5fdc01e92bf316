# minicoder: `make demo` runs the whole miniature lifecycle; `make test` runs the test suite.
# Both create .venv/ and install everything first (torch==2.13.0 CPU from pip, then this package).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MC := $(BIN)/minicoder
DEMO ?= runs/demo
DEMO_STEPS ?= 400
DEMO_SFT_STEPS ?= 200

export TOKENIZERS_PARALLELISM ?= true
export PIP_DISABLE_PIP_VERSION_CHECK = 1
# llama-cpp-python (dev extra) compiles llama.cpp: two jobs, and without the multimodal library nothing here uses
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: install browser demo test test-slow test-soak bench bench-setup screenshots clean

$(BIN)/.installed: pyproject.toml
	command -v cmake >/dev/null && command -v g++ >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Tabby's editor agent (npm), driven by tests/test_clients.py as a real Tabby client.
TABBY_AGENT := build/npm/node_modules/tabby-agent/dist/cli.js
$(TABBY_AGENT):
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	npm install --silent --no-audit --no-fund --prefix build/npm tabby-agent@1.5.0

install: $(BIN)/.installed $(TABBY_AGENT)

demo: install
	@start=$$(date +%s); set -e; rm -rf $(DEMO); \
	echo "== 1/7 corpus: the Python standard library, filtered, ordered, deduplicated, decontaminated"; \
	$(MC) data corpus stdlib --out $(DEMO)/corpus; \
	echo "== 2/7 tokenizer: byte-level BPE, 4096 tokens"; \
	$(MC) tokenizer train --corpus $(DEMO)/corpus --out $(DEMO)/tokenizer --vocab-size 4096; \
	echo "== 3/7 pack: fill-in-the-middle per chunk inside 512-token windows (rate 0.5, PSM+SPM), uint16 shards, validation by repository"; \
	$(MC) data pack --corpus $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data; \
	echo "== 4/7 pretrain: the nano preset"; \
	$(MC) pretrain --config configs/nano.toml --data $(DEMO)/data --out $(DEMO) --max-steps $(DEMO_STEPS); \
	echo "== 5/7 generate with the pretrained model (greedy)"; \
	for prompt in 'def fibonacci(n):' 'import os' 'class Stack:'; do \
	  echo "--- prompt: $$prompt"; printf '%s' "$$prompt"; \
	  $(MC) generate $(DEMO)/final --prompt "$$prompt" --max-new-tokens 48; \
	done; \
	echo "--- fill in the middle: prefix 'def add(a, b):\\n    return ', suffix '\\n\\n\\ndef sub(a, b):\\n    return a - b\\n' -> middle:"; \
	$(MC) generate $(DEMO)/final --prompt $$'def add(a, b):\n    return ' --suffix $$'\n\n\ndef sub(a, b):\n    return a - b\n' --max-new-tokens 16; \
	echo "== 6/7 SFT: instruction pairs mined from the corpus, loss on assistant tokens"; \
	$(MC) data sft --corpus $(DEMO)/corpus --out $(DEMO)/sft_data --max-pairs 4000; \
	$(MC) sft --config configs/nano_sft.toml --init $(DEMO)/final --data $(DEMO)/sft_data --out $(DEMO)/sft --max-steps $(DEMO_SFT_STEPS); \
	echo "== 7/7 chat with the SFT model (greedy)"; \
	for q in 'Write a Python function `def is_palindrome(s)` that returns True when s reads the same backwards.' \
	         'Write a docstring for this function:'$$'\n```python\ndef add(a, b):\n    return a + b\n```'; do \
	  echo "--- user: $$q"; $(MC) generate $(DEMO)/sft/final --chat --prompt "$$q" --max-new-tokens 96; \
	done; \
	echo "== done in $$(( $$(date +%s) - start ))s; pretrained model: $(DEMO)/final, SFT model: $(DEMO)/sft/final (corpus, tokenizer, data, checkpoints, logs, loss.png beside them)"

# The web UI's browser tests drive Debian's chromium: installed here where we can (root with apt), else they
# are skipped and say why (`pytest -rs`).
install: browser
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	  || echo "note: apt could not install chromium: the browser tests will be skipped"; \
	else echo "note: no /usr/bin/chromium (apt-get install chromium, as root): the browser tests will be skipped"; fi

test: install
	$(BIN)/python -m pytest -q -rs --durations=15

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Load and fault soaks (not in `make test`): SOAK_SECONDS / SOAK_CLIENTS change the load, SOAK_REPORT=FILE.json keeps the numbers.
test-soak: install
	$(BIN)/pip install -q -e '.[soak]'
	$(BIN)/python -m pytest -q -s -m soak -p no:cacheprovider

# The web UI's screenshots in docs/ui/, taken by its browser tests.
screenshots: install
	MINICODER_UI_SCREENSHOTS=docs/ui $(BIN)/python -m pytest -q -rs tests/test_ui_browser.py

# Benchmarks (docs/benchmarks.md; on a quiet machine): raw JSON under BENCH_OUT, then the doc's tables rendered
# from it. bench-setup builds llama.cpp's servers and installs vLLM's CPU build in build/vllm-venv (not a dependency).
# ENGINE_ARGS="--compile on" passes `minicoder serve` flags to every minicoder run.
BENCH_OUT ?= runs/bench
ENGINE_ARGS ?=
bench-setup: install
	benchmarks/setup_llamacpp.sh
	benchmarks/setup_vllm.sh

bench: install
	$(BIN)/python benchmarks/train_throughput.py --out $(BENCH_OUT)
	$(BIN)/python benchmarks/decode_bench.py --out $(BENCH_OUT) --engine-args="$(ENGINE_ARGS)"
	$(BIN)/python benchmarks/serving_bench.py --out $(BENCH_OUT) --engine-args="$(ENGINE_ARGS)"
	$(BIN)/python benchmarks/profile_bench.py --out $(BENCH_OUT) --engine-args="$(ENGINE_ARGS)"
	$(BIN)/python benchmarks/render.py --results $(BENCH_OUT)

# The shipped model's recipe, corpus to model card, resumable: `make model` again continues where it stopped.
MODEL ?= runs/model
RECIPE ?= small
.PHONY: model
model: install
	$(MC) recipe $(RECIPE) --out $(MODEL) $$([ -f $(MODEL)/recipe.json ] && echo --resume)

# Its bf16 base + instruct models and card into models/minicoder-small, the default model (then commit that folder).
.PHONY: ship
ship: install
	$(MC) export ship $(MODEL) --out models/minicoder-small $$([ -d models/minicoder-small ] && echo --force)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
