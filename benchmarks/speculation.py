"""Prompt-lookup speculation benchmark: decode tok/s with and without `--speculative ngram`, and acceptance.

Edit-style prompts are built from functions of this repository's own source: the function, then a request
to rewrite it and its first line, so a code model's continuation repeats spans of the prompt (what
prompt lookup is for). Normal prompts are the same functions' signatures alone (little to copy). Each
configuration (plain decoding, then ngram with each K) runs the same requests in one engine, one
request at a time (batch 1, where a decode step is bound by reading the weights) and, with --batch, all
at once. Requests are greedy, or with --temperature T sampled with a fixed seed (speculation then verifies
drafts by rejection sampling). Every speculative run's tokens are checked against plain decoding's (for
sampled requests they match too, but for a rare draw moved by float rounding). Raw measurements go to
--out as JSON; nothing is interpreted here.

  .venv/bin/python benchmarks/speculation.py --model runs/demo/final --out build/speculation.json
  .venv/bin/python benchmarks/speculation.py --model runs/demo/final --prompts 2 --new-tokens 16 --k 4  # smoke test
  .venv/bin/python benchmarks/speculation.py --model runs/demo/final --temperature 0.7 --out build/speculation-t07.json

Run it on a quiet machine: timings taken while other work runs say nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import time
from pathlib import Path

import torch

from minicoder.engine import Engine, EngineConfig, SamplingParams
from minicoder.engine.speculation import SpeculativeConfig

ROOT = Path(__file__).resolve().parent.parent


def source_functions(limit: int, fits, min_lines: int = 8, max_lines: int = 30) -> list[str]:
    """Top-level functions of src/minicoder, 8-30 lines long, whose prompts `fits`, in a fixed order."""
    found = []
    for path in sorted((ROOT / "src" / "minicoder").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                function = ast.get_source_segment(text, node)
                if fits(edit_prompt(function)):
                    found.append(function)
                if len(found) == limit:
                    return found
    return found


def edit_prompt(function: str) -> str:
    return f"{function}\n\n\n# The same function, rewritten with clearer variable names:\n{function.splitlines()[0]}\n"


def build_prompts(count: int, fits) -> dict[str, list[str]]:
    functions = source_functions(count, fits)
    return {"edit": [edit_prompt(f) for f in functions], "normal": [f.splitlines()[0] + "\n" for f in functions]}


def run_config(model: Path, prompts: list[str], params: SamplingParams, speculative: SpeculativeConfig | None,
               batch: bool, dtype: str) -> dict:
    engine = Engine(model, EngineConfig(dtype=dtype, speculative=speculative, max_num_seqs=16))
    engine.run_to_completion(prompts[:1], SamplingParams(max_new_tokens=8))  # warm-up
    engine.kv.reset_prefix_cache()  # every configuration prefills the prompts itself
    before = engine.speculation.draft_tokens, engine.speculation.accepted_tokens
    outputs, seconds = [], 0.0
    groups = [prompts] if batch else [[p] for p in prompts]
    for group in groups:
        start = time.perf_counter()
        outputs += engine.run_to_completion(group, params)
        seconds += time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outputs)
    drafts = engine.speculation.draft_tokens - before[0]
    accepted = engine.speculation.accepted_tokens - before[1]
    return {
        "speculative": None if speculative is None else vars(speculative),
        "batch": batch, "requests": len(prompts), "completion_tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "draft_tokens": drafts, "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafts if drafts else None,
        "per_request": [{"completion_tokens": o.completion_tokens, "draft_tokens": o.draft_tokens,
                         "accepted_draft_tokens": o.accepted_draft_tokens, "finish_reason": o.finish_reason}
                        for o in outputs],
        "token_ids": [o.token_ids for o in outputs],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "final"), help="a model directory")
    ap.add_argument("--prompts", type=int, default=8, help="functions (edit-style and normal prompt each)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled with --seed")
    ap.add_argument("--seed", type=int, default=0, help="the sampled requests' seed")
    ap.add_argument("--k", default="2,5,8", help="comma-separated num_speculative_tokens values")
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--batch", action="store_true", help="also run all prompts at once")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(ROOT / "build" / "speculation.json"))
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"error: {model}: not a model directory (pass --model)")
    torch.set_num_threads(args.threads)
    # Stops at end-of-sequence as users see; a seed makes sampled runs comparable across configurations.
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed)
    try:
        params.validate()
    except ValueError as e:
        raise SystemExit(f"error: --{str(e).split()[0]}: {e}") from None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    context = json.loads((model / "config.json").read_text()).get("max_position_embeddings", 2048)
    prompts_by_kind = build_prompts(args.prompts, lambda p: len(tokenizer.encode(p)) + args.new_tokens < context)
    results = []
    for kind, prompts in prompts_by_kind.items():
        for batch in (False, True) if args.batch else (False,):
            plain = run_config(model, prompts, params, None, batch, args.dtype)
            results.append({"prompts": kind, **plain})
            for k in (int(x) for x in args.k.split(",")):
                spec = SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=args.prompt_lookup_min,
                                         prompt_lookup_max=args.prompt_lookup_max)
                row = run_config(model, prompts, params, spec, batch, args.dtype)
                row["same_tokens_as_plain"] = row["token_ids"] == plain["token_ids"]
                row["speedup"] = (row["tokens_per_second"] / plain["tokens_per_second"]
                                  if row["tokens_per_second"] and plain["tokens_per_second"] else None)
                results.append({"prompts": kind, **row})
            for row in results[-1 - len(args.k.split(",")):]:
                rate = row["acceptance_rate"]
                print(f"{kind:6} batch={row['batch']!s:5} K={(row['speculative'] or {}).get('num_speculative_tokens', '-')!s:2} "
                      f"{row['tokens_per_second']:8.1f} tok/s  acceptance {'-' if rate is None else f'{rate:.2f}'}"
                      f"  same tokens {row.get('same_tokens_as_plain', '-')}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(model), "threads": args.threads, "dtype": args.dtype,
                               "new_tokens": args.new_tokens, "temperature": args.temperature, "seed": args.seed, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "results": results}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}: {len(results)} configurations")


if __name__ == "__main__":
    main()
