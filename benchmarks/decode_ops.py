"""Ops and time per decode step of the engine's runner: eager vs the torch.compile'd step, at batch 1 and 16.

    python benchmarks/decode_ops.py                      # op counts (meaningful on a busy machine too)
    python benchmarks/decode_ops.py --time --rounds 5    # + ms per step, eager and compiled interleaved
    python benchmarks/decode_ops.py --model runs/demo/final --dtype bf16 --json out.json

Op counts come from torch.profiler: "aten ops" is every aten call (nested ones included, as the serving
benchmark's profile counts them), "top-level" only those the step itself issues, "kernels" the compiled
step's fused C++ kernels (inductor's kernel profiling on). Without --model the model is a random one of the
demo model's shape (nano.toml). Time only on a quiet machine: the A/B rounds alternate eager and compiled so
drift hits both alike, and the best round of each is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minicoder.engine.options import resolve_dtype
from minicoder.engine.runner import PagedLlamaRunner, SequenceChunk
from minicoder.model import LlamaForCausalLM, ModelConfig

DEMO_SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)


def load(model: str | None, dtype) -> LlamaForCausalLM:
    if model:
        return LlamaForCausalLM.from_pretrained(model, dtype=dtype)
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig(**DEMO_SHAPE)).to(dtype).eval()


def decode_chunks(batch: int, context: int, block_size: int) -> list[SequenceChunk]:
    per = -(-(context + 1) // block_size)
    return [SequenceChunk(str(i), [5 + i], context, list(range(i * per, (i + 1) * per)), True) for i in range(batch)]


def count_ops(runner: PagedLlamaRunner, chunks, steps: int = 10) -> dict:
    for _ in range(3):
        runner.forward(chunks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.forward(chunks)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    kernels = [e for e in events if "cpp_fused" in e.name or e.name.startswith("graph_")]
    names: dict[str, int] = {}
    for e in top:
        names[e.name] = names.get(e.name, 0) + 1
    return {"aten_ops": len(aten) // steps, "top_level_aten_ops": len(top) // steps, "kernels": len(kernels) // steps,
            "top_ops": sorted(((n // steps, k) for k, n in names.items()), reverse=True)[:8]}


def ms_per_step(runner: PagedLlamaRunner, chunks, steps: int) -> float:
    for _ in range(3):
        runner.forward(chunks)
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward(chunks)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model directory (default: a random model of the demo model's shape)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=128, help="cached tokens per request")
    p.add_argument("--time", action="store_true", help="also time ms per step (quiet machine only)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write the measurements here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # fused kernels show up in the profile
    dtype = resolve_dtype(args.dtype)[0]
    batches = [int(b) for b in args.batches.split(",")]
    block_size = 16
    blocks = max(batches) * -(-(args.context + 1) // block_size)
    eager = PagedLlamaRunner(load(args.model, dtype), blocks, block_size)
    compiled = PagedLlamaRunner(load(args.model, dtype), blocks, block_size)
    started = time.perf_counter()
    compiled.compile_decode()
    results = {"dtype": str(dtype), "threads": torch.get_num_threads(), "context": args.context,
               "compile_seconds": round(time.perf_counter() - started, 1), "batches": {}}
    for batch in batches:
        chunks = decode_chunks(batch, args.context, block_size)
        row = {"eager": count_ops(eager, chunks), "compiled": count_ops(compiled, chunks)}
        if args.time:
            times = {"eager": [], "compiled": []}
            for _ in range(args.rounds):  # interleaved: eager, compiled, eager, ...
                for name, runner in (("eager", eager), ("compiled", compiled)):
                    times[name].append(ms_per_step(runner, chunks, args.steps))
            for name in times:
                row[name]["ms_per_step"] = round(min(times[name]), 3)
                row[name]["tok_per_s"] = round(batch * 1e3 / min(times[name]), 1)
        results["batches"][batch] = row
        for name in ("eager", "compiled"):
            r = row[name]
            timing = f", {r['ms_per_step']} ms/step, {r['tok_per_s']} tok/s" if args.time else ""
            print(f"batch {batch:>2} {name:>8}: {r['aten_ops']} aten ops ({r['top_level_aten_ops']} top-level), "
                  f"{r['kernels']} fused kernels{timing}; top: {', '.join(f'{k} x{n}' for n, k in r['top_ops'][:5])}")
    print(f"compile + warm-up: {results['compile_seconds']} s; dtype {dtype}, {results['threads']} threads")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
