# minicoder: `make demo` runs the whole miniature lifecycle; `make test` runs the test suite.
# Both create .venv/ and install everything first (torch==2.13.0 CPU from pip, then this package).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MC := $(BIN)/minicoder
DEMO ?= runs/demo
DEMO_FILES ?= 2500
DEMO_STEPS ?= 400

export TOKENIZERS_PARALLELISM ?= true
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test test-slow bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	@start=$$(date +%s); set -e; rm -rf $(DEMO); \
	echo "== 1/5 corpus: the Python standard library, filtered, ordered, deduplicated, decontaminated"; \
	$(MC) data corpus stdlib --out $(DEMO)/corpus --max-files $(DEMO_FILES); \
	echo "== 2/5 tokenizer: byte-level BPE, 4096 tokens"; \
	$(MC) tokenizer train --corpus $(DEMO)/corpus --out $(DEMO)/tokenizer --vocab-size 4096; \
	echo "== 3/5 pack: fill-in-the-middle (rate 0.5, PSM), uint16 shards, validation by repository"; \
	$(MC) data pack --corpus $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data; \
	echo "== 4/5 pretrain: the nano preset"; \
	$(MC) pretrain --config configs/nano.toml --data $(DEMO)/data --out $(DEMO) --max-steps $(DEMO_STEPS); \
	echo "== 5/5 generate (greedy)"; \
	for prompt in 'def fibonacci(n):' 'import os' 'class Stack:'; do \
	  echo "--- prompt: $$prompt"; printf '%s' "$$prompt"; \
	  $(MC) generate $(DEMO)/final --prompt "$$prompt" --max-new-tokens 48; \
	done; \
	echo "--- fill in the middle: prefix 'def add(a, b):\\n    return ', suffix '\\n\\n\\ndef sub(a, b):\\n    return a - b\\n' -> middle:"; \
	$(MC) generate $(DEMO)/final --prompt $$'def add(a, b):\n    return ' --suffix $$'\n\n\ndef sub(a, b):\n    return a - b\n' --max-new-tokens 16; \
	echo "== done in $$(( $$(date +%s) - start ))s; final model: $(DEMO)/final (corpus, tokenizer, data, checkpoints, log.jsonl, loss.png beside it)"

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
