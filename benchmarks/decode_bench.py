"""Batch-1 decode tokens/s, in process, on the same weights: minicoder's engine in fp32 / bf16 / int8 / int4
against llama.cpp (llama-cpp-python on the GGUF export) in f32 / f16 / bf16 / q8_0 / q4_0, transformers
`generate` in fp32, and llama.cpp's native `llama-bench` figure for reference; on the demo model and a ~200M
random Llama. Rate = tokens after the first / time between the first and the last (prefill excluded), best
of --repeats after a warm-up; greedy, fixed prompt, fixed output length.

  .venv/bin/python benchmarks/decode_bench.py                          # both models, every format
  .venv/bin/python benchmarks/decode_bench.py --models demo --formats fp32 --llama-types f32 --repeats 1
  .venv/bin/python benchmarks/decode_bench.py --engine-args="--compile on"   # extra `minicoder serve` flags

Ratios printed at the end: minicoder fp32/llama.cpp f32, bf16/bf16 (and /f16), int8/q8_0, int4/q4_0.
Raw results: OUT/decode-*.json (benchmarks/common.py); `--render` fills docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time

from common import LLAMA_BIN, Run, add_common_args, measured, ratio
from models import BenchModel, engine_config, prepare_models, prompt_ids, split_flags

FORMATS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"],
           "int8": ["--dtype", "float32", "--quantize", "int8"], "int4": ["--dtype", "float32", "--quantize", "int4"]}
# (minicoder format, llama.cpp type) pairs whose ratio the aims ask for: the same bit width.
PAIRS = (("fp32", "f32"), ("bf16", "bf16"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))
LLAMA_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def best_of(run, n: int, repeats: int) -> tuple[float, list[int]]:
    """Warm up with 8 tokens, then the best rate of `repeats` runs of n tokens; run(k) -> (arrival times, ids)."""
    run(8)
    rates, tokens = [], []
    for _ in range(repeats):
        times, tokens = run(n)
        rates.append(_rate(times))
    return max(rates), tokens


def decode_minicoder(m: BenchModel, ids: list[int], n: int, repeats: int, fmt: str, engine_args: list[str]) -> dict:
    import torch

    from minicoder.engine import Engine, SamplingParams

    flags = [*FORMATS[fmt], "--max-num-seqs", "1", *engine_args]
    config = engine_config(flags)
    engine = Engine(m.path, config)

    def run(k):
        times, out = [], None
        for out in engine.stream(ids, SamplingParams(max_new_tokens=k, ignore_eos=True)):
            times.append(time.perf_counter())
        return times, out.token_ids

    tok_s, tokens = best_of(run, n, repeats)
    weight_bytes = getattr(engine.runner, "weight_bytes", lambda: None)() if hasattr(engine, "runner") else None
    dtype = config.dtype if isinstance(config.dtype, str) else str(config.dtype).removeprefix("torch.")
    del engine
    torch._dynamo.reset()  # graphs a compiled engine (--engine-args) left behind go with it
    return {"system": f"minicoder ({fmt})", "family": "minicoder", "format": fmt, "tok_s": tok_s, "tokens": tokens,
            "weight_bytes": weight_bytes, "flags": flags, "dtype": dtype}


class _TimingStreamer:
    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def decode_transformers(m: BenchModel, ids: list[int], n: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed length: no end-of-sequence stop
    model.generation_config.pad_token_id = 0
    x = torch.tensor([ids])

    def run(k):
        streamer = _TimingStreamer()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=k, streamer=streamer)
        return streamer.times, out[0, len(ids):].tolist()

    tok_s, tokens = best_of(run, n, repeats)
    return {"system": "transformers generate (fp32)", "family": "transformers", "format": "fp32", "tok_s": tok_s,
            "tokens": tokens}


def decode_llama_cpp(m: BenchModel, qtype: str, ids: list[int], n: int, repeats: int, threads: int,
                     repack: bool) -> dict:
    """`repack=False` loads without llama.cpp's CPU weight repacking, which segfaults on quantized tensors with
    llama-cpp-python 0.3.36 on an AVX-512/AMX machine (it is llama.cpp's fastest path where it works, so a
    ratio measured without it flatters minicoder: the JSON and the table say which was used)."""
    import llama_cpp

    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not repack:
        llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(str(m.ggufs[qtype]), n_ctx=len(ids) + n + 64, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params

    def run(k):
        times, tokens = [], []
        llm.reset()
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == k:
                break
        return times, tokens

    tok_s, tokens = best_of(run, n, repeats)
    llm.close()
    return {"system": f"llama.cpp ({qtype})", "family": "llama.cpp", "format": qtype, "tok_s": tok_s,
            "tokens": tokens, "repack": repack}


def llama_bench(m: BenchModel, qtype: str, n: int, threads: int) -> dict | None:
    exe = LLAMA_BIN / "llama-bench"
    if not exe.is_file():
        return None
    try:
        out = subprocess.run([str(exe), "-m", str(m.ggufs[qtype]), "-p", "0", "-n", str(n), "-t", str(threads),
                              "-r", "3", "-o", "json"], capture_output=True, text=True, timeout=300)
        rows = json.loads(out.stdout)
        best = max(rows[0].get("samples_ts") or [rows[0]["avg_ts"]])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as e:
        print(f"llama-bench failed: {e}", flush=True)
        return None
    return {"system": f"llama-bench tg{n} ({qtype}, native, empty context)", "family": "llama-bench",
            "format": qtype, "tok_s": float(best)}


def leading_match(a: list[int], b: list[int]) -> tuple[int, int]:
    k = min(len(a), len(b))
    return next((i for i in range(k) if a[i] != b[i]), k), k


def run_model(m: BenchModel, args, engine_args: list[str]) -> dict:
    ids = prompt_ids(m)
    n = m.new_tokens * 2 if m.name == "demo" else m.new_tokens
    runs = [lambda f=f: decode_minicoder(m, ids, n, args.repeats, f, engine_args) for f in args.formats]
    if args.transformers:
        runs.append(lambda: decode_transformers(m, ids, n, args.repeats))
    runs += [lambda q=q: decode_llama_cpp(m, q, ids, n, args.repeats, args.threads,
                                          args.llama_repack or q in ("f32", "f16", "bf16")) for q in m.ggufs]
    runs += [lambda q=q: llama_bench(m, q, n, args.threads) for q in m.ggufs]
    results = []
    for run in runs:
        res, load = measured(run, args.retries)
        if res is not None:
            res["foreign_load"] = load
            results.append(res)
            print(f"  [{m.name}] batch 1, {n} tokens, prompt {len(ids)}: {res['system']}: {res['tok_s']:,.1f} tok/s",
                  flush=True)
        gc.collect()
    by = {(r["family"], r["format"]): r for r in results}
    ratios, matches = {}, {}
    for ours, theirs in PAIRS:
        if (v := ratio(by.get(("minicoder", ours), {}).get("tok_s"), by.get(("llama.cpp", theirs), {}).get("tok_s"))):
            ratios[f"minicoder {ours} / llama.cpp {theirs}"] = v
    ref = by.get(("minicoder", "fp32"))
    if ref and (hf := by.get(("transformers", "fp32"))):
        ratios["minicoder fp32 / transformers fp32"] = ref["tok_s"] / hf["tok_s"]
    for r in results:
        if ref and r is not ref and r.get("tokens"):
            matches[r["system"]] = leading_match(ref["tokens"], r["tokens"])
    for k, v in ratios.items():
        print(f"  [{m.name}] {k}: {v:.2f}x", flush=True)
    return {"model": m.as_json(), "new_tokens": n, "prompt_tokens": len(ids), "runs": results, "ratios": ratios,
            "greedy_match_vs_minicoder_fp32": matches}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, retries=True)
    ap.add_argument("--models", default="demo,200M", help="comma-separated: demo, 200M")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"minicoder formats (default {','.join(FORMATS)})")
    ap.add_argument("--llama-types", default=",".join(LLAMA_TYPES), help="llama.cpp GGUF types (empty: none)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers generate")
    ap.add_argument("--llama-repack", action="store_true",
                    help="let llama.cpp repack quantized weights (its fastest CPU path; crashes on some CPUs)")
    ap.add_argument("--engine-args", default="", help='extra `minicoder serve` flags for every minicoder run, '
                    'e.g. "--compile on" (the last occurrence of a flag wins)')
    ap.add_argument("--quick", action="store_true", help="fewer tokens")
    ap.add_argument("--new-tokens", type=int, default=0, help="output tokens (default per model; demo: twice)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        ap.error(f"--formats: unknown {', '.join(unknown)} (known: {', '.join(FORMATS)})")
    engine_args = split_flags(args.engine_args)
    engine_config(engine_args)  # a bad flag fails here, before any model is built
    run = Run("decode", args)
    models = prepare_models([s for s in args.models.split(",") if s], args.quick, args.new_tokens,
                            tuple(t for t in args.llama_types.split(",") if t))
    results = {"engine_args": engine_args, "repeats": args.repeats, "threads": args.threads,
               "models": {m.name: run_model(m, args, engine_args) for m in models}}
    run.save(results)


if __name__ == "__main__":
    main()
