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

.PHONY: install demo test test-slow bench clean

$(BIN)/.installed: pyproject.toml
	command -v cmake >/dev/null && command -v g++ >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	@start=$$(date +%s); set -e; rm -rf $(DEMO); \
	echo "== 1/7 corpus: the Python standard library, filtered, ordered, deduplicated, decontaminated"; \
	$(MC) data corpus stdlib --out $(DEMO)/corpus; \
	echo "== 2/7 tokenizer: byte-level BPE, 4096 tokens"; \
	$(MC) tokenizer train --corpus $(DEMO)/corpus --out $(DEMO)/tokenizer --vocab-size 4096; \
	echo "== 3/7 pack: fill-in-the-middle (rate 0.5, PSM), uint16 shards, validation by repository"; \
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

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
