"""Grammar-constrained decoding libraries on CPU: llguidance vs xgrammar (and outlines-core when installed).

For a byte-level BPE vocabulary like minicoder's (trained here on the Python standard library, default 8192
tokens) and a JSON schema with nested objects, arrays, enums and bounded strings, it measures what the
serving engine pays: building the library's tokenizer view (once per engine), compiling the schema (once per
new schema), creating a matcher (per request), and the per-token mask at batch 1 and 8 (every step), walking
the tokens of a valid document so every matcher advances as a request would.

    .venv/bin/python benchmarks/guided_bench.py                    # the libraries that import
    .venv/bin/python benchmarks/guided_bench.py --vocab-size 400 --steps 20     # smoke test

xgrammar is not a minicoder dependency (it pulls triton); to compare, install it beside the venv:
    .venv/bin/pip install --no-deps --target /tmp/xgr xgrammar==0.2.8 apache-tvm-ffi
    PYTHONPATH=/tmp/xgr .venv/bin/python benchmarks/guided_bench.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "version": {"type": "integer", "minimum": 0},
        "license": {"enum": ["MIT", "Apache-2.0", "BSD-3-Clause"]},
        "dependencies": {"type": "array", "items": {
            "type": "object",
            "properties": {"package": {"type": "string"}, "pinned": {"type": "boolean"}},
            "required": ["package", "pinned"], "additionalProperties": False}},
        "entry_points": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name", "version", "license", "dependencies"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "minicoder-demo", "version": 3, "license": "MIT",
            "dependencies": [{"package": "torch", "pinned": True}, {"package": "fastapi", "pinned": False},
                             {"package": "tokenizers", "pinned": True}]}


def bpe_tokenizer(vocab_size: int, out: Path):
    """minicoder's byte-level BPE trained on ~2 MB of the standard library, loaded as transformers loads it."""
    from transformers import AutoTokenizer

    from minicoder.tokenizer import save_tokenizer, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        texts.append(path.read_text(errors="ignore"))
        size += len(texts[-1])
        if size > 2_000_000:
            break
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), out)
    return AutoTokenizer.from_pretrained(out)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return (time.perf_counter() - start) / repeat, result


def bench_llguidance(hf, vocab: int, tokens: list[int], batches: list[int], parallel: bool = False) -> dict:
    import llguidance
    import llguidance.hf

    setup, tok = timed(lambda: llguidance.hf.from_tokenizer(hf, n_vocab=vocab))
    compile_s, grammar = timed(lambda: llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}))
    check_s, _ = timed(lambda: llguidance.LLMatcher.validate_grammar(grammar, tok))
    matcher_s, _ = timed(lambda: llguidance.LLMatcher(tok, grammar), repeat=5)
    executor = llguidance.LLExecutor()
    words = (vocab + 31) // 32
    masks = {}
    for batch in batches:
        matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(batch)]
        bitmask = torch.zeros((batch, words), dtype=torch.int32)
        times = []
        for t in tokens:
            start = time.perf_counter()
            if not parallel:  # one after the other, as the engine does
                for i, m in enumerate(matchers):
                    m.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * words * 4, words * 4)
            else:
                executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                 words * 4, batch)
            times.append(time.perf_counter() - start)
            for m in matchers:
                assert m.consume_token(t), m.get_error()
        masks[batch] = times
    return {"setup": setup, "compile": compile_s + check_s, "matcher": matcher_s, "masks": masks}


def bench_xgrammar(hf, vocab: int, tokens: list[int], batches: list[int]) -> dict:
    import xgrammar as xgr

    setup, info = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_s, compiled = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                        separators=(",", ":")))
    matcher_s, _ = timed(lambda: xgr.GrammarMatcher(compiled), repeat=5)
    batch_matcher = xgr.BatchGrammarMatcher()
    masks = {}
    for batch in batches:
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        bitmask = xgr.allocate_token_bitmask(batch, vocab)
        times = []
        for t in tokens:
            start = time.perf_counter()
            if batch == 1:
                matchers[0].fill_next_token_bitmask(bitmask, 0)
            else:
                batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
            times.append(time.perf_counter() - start)
            for m in matchers:
                assert m.accept_token(t)
        masks[batch] = times
    return {"setup": setup, "compile": compile_s, "matcher": matcher_s, "masks": masks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=0, help="tokens of the document to walk (0 = all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hf = bpe_tokenizer(args.vocab_size, Path(tmp))
    vocab = len(hf)
    tokens = hf.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    tokens = tokens[: args.steps] if args.steps else tokens
    print(f"vocabulary {vocab} tokens; document {len(tokens)} tokens; schema {len(json.dumps(SCHEMA))} chars")
    print(f"{'library':<12} {'tokenizer s':>11} {'compile ms':>10} {'matcher ms':>10} "
          f"{'mask b1 us (p50/p99)':>22} {'mask b8 us (p50/p99)':>22}")
    benches = (("llguidance", bench_llguidance), ("llg thread", lambda *a: bench_llguidance(*a, parallel=True)),
               ("xgrammar", bench_xgrammar))
    for name, bench in benches:
        try:
            r = bench(hf, vocab, tokens, [1, 8])
        except ImportError as e:
            print(f"{name:<12} not installed ({e})")
            continue
        cells = []
        for batch in (1, 8):
            times = sorted(r["masks"][batch])
            p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
            cells.append(f"{statistics.median(times) * 1e6:.0f} / {p99 * 1e6:.0f}")
        print(f"{name:<12} {r['setup']:>11.2f} {r['compile'] * 1e3:>10.1f} {r['matcher'] * 1e3:>10.2f} "
              f"{cells[0]:>22} {cells[1]:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
