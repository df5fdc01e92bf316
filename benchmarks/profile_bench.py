"""Where minicoder's decode time goes, in process: the engine's step loop at batch 1 and 16 (each part timed
with wrappers, no profiler running), torch.profiler's aten-op split, cProfile's Python functions, and kernel
checks on each model's shapes (the fused gate/up matmul as the engine runs it vs oneDNN prepacked and bf16
weights; one layer's paged decode attention vs SDPA / a grouped matmul on contiguous K/V).

  .venv/bin/python benchmarks/profile_bench.py                       # both models, batch 1 and 16
  .venv/bin/python benchmarks/profile_bench.py --models demo --batches 1 --steps 10
  .venv/bin/python benchmarks/profile_bench.py --engine-args="--compile on"

Raw results: OUT/profile-*.json (benchmarks/common.py); `--render` fills docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Run, add_common_args, probes
from models import BenchModel, engine_config, prepare_models, prompt_ids, split_flags

from minicoder.engine import Engine, SamplingParams
from minicoder.model import ModelConfig


def _engine(m: BenchModel, batch: int, engine_args: list[str]) -> Engine:
    return Engine(m.path, engine_config(["--dtype", "float32", "--max-num-seqs", str(batch), *engine_args]))


def profile_engine(m: BenchModel, batch: int, steps: int, engine_args: list[str]) -> dict:
    import minicoder.engine.engine as engine_mod
    from minicoder.engine.request import Request

    engine = _engine(m, batch, engine_args)
    timers: dict[str, float] = {}
    restore = []

    def wrap(owner, attr: str, name: str):
        """Time owner.attr under `name` (skipped when this engine version has no such attribute)."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t

        restore.append((owner, attr, fn))
        setattr(owner, attr, timed)

    wrap(engine.runner, "forward", "forward")
    wrap(engine.scheduler, "schedule", "scheduler")
    wrap(engine.scheduler, "after_step", "scheduler")
    wrap(engine_mod, "sample", "sampler")
    wrap(Request, "append_token", "append token + detokenize")
    try:
        params = SamplingParams(max_new_tokens=steps * 3 + 40, ignore_eos=True)
        # a first request end to end, so the prefill below is timed warm
        list(engine.stream(prompt_ids(m, 999), SamplingParams(max_new_tokens=4, ignore_eos=True)))
        prompts = [prompt_ids(m, i) for i in range(batch)]
        ids = [engine.submit(p, params) for p in prompts]
        t = time.perf_counter()
        while any(not engine.requests[i].output_ids for i in ids):  # prefill (chunked)
            engine.step()
        prefill_ms = (time.perf_counter() - t) * 1e3 / sum(len(p) for p in prompts)
        for _ in range(20):  # decode warm-up
            engine.step()
        timers.clear()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t
        parts = {k: v / steps * 1e3 for k, v in timers.items()}
        parts["other"] = total / steps * 1e3 - sum(parts.values())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                engine.step()
    finally:
        for owner, attr, fn in reversed(restore):
            setattr(owner, attr, fn)
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    self_total = sum(e.self_cpu_time_total for e in aten) or 1
    top = sorted(aten, key=lambda e: -e.self_cpu_time_total)[:7]
    attention = sum(e.self_cpu_time_total for e in aten if "scaled_dot_product" in e.key
                    or e.key == "aten::index_select") / self_total
    matmul = sum(e.self_cpu_time_total for e in aten if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / self_total
    return {"batch": batch, "steps": steps, "step_ms": total / steps * 1e3, "parts_ms": parts,
            "top_aten_ops_pct": [(e.key, 100 * e.self_cpu_time_total / self_total) for e in top],
            "aten_ops_per_step": sum(e.count for e in aten) // 20, "prefill_ms_per_prompt_token": prefill_ms,
            "attention_share": attention, "matmul_share": matmul,
            "context_tokens": [min(map(len, prompts)) + 20, max(map(len, prompts)) + 20 + steps]}


def cprofile_top(m: BenchModel, batch: int, steps: int, engine_args: list[str], limit: int = 12) -> list:
    """(function, own ms/step, cumulative ms/step) of the engine step loop, by cumulative time."""
    engine = _engine(m, batch, engine_args)
    params = SamplingParams(max_new_tokens=steps * 2 + 40, ignore_eos=True)
    for i in range(batch):
        engine.submit(prompt_ids(m, i), params)
    for _ in range(20):
        engine.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    rows = [(f"{Path(file).name}:{fn}" if file != "~" else fn, tt / steps * 1e3, ct / steps * 1e3)
            for (file, _line, fn), (_cc, _nc, tt, ct, _callers) in pstats.Stats(prof).stats.items()]
    return sorted(rows, key=lambda r: -r[2])[:limit]


def _ms_per_call(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def kernel_checks(m: BenchModel, context: int = 200, batch: int = 16) -> dict[str, float]:
    """ms per call, one layer, this model's shapes: the fused gate/up matmul as the engine runs it (`x @ W`,
    input-major) vs oneDNN prepacked weights (what inductor's CPU freezing uses) and bf16 weights; decode
    attention over a paged cache as the engine ran it (gather + SDPA on strided views) vs SDPA / grouped matmul
    on contiguous head-major K/V."""
    cfg = ModelConfig.from_hf_dict(json.loads((m.path / "config.json").read_text()))
    h, f, H, KV, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim)
    out = {}
    with torch.inference_mode():
        w = torch.randn(2 * f, h)  # (out, in), as nn.Linear stores it
        w_in, packed = w.t().contiguous(), torch.ops.mkldnn._reorder_linear_weight(w, batch)
        w_bf16 = w_in.bfloat16()
        for rows in (1, batch):
            x = torch.randn(rows, h)
            xb = x.bfloat16()
            out[f"matmul x@W M={rows}"] = _ms_per_call(lambda: x @ w_in)
            out[f"matmul prepacked M={rows}"] = _ms_per_call(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            out[f"matmul bf16 M={rows}"] = _ms_per_call(lambda: xb @ w_bf16)
        bs, width = 16, -(-context // 16)
        k_cache = torch.randn(batch * width * 2, bs, KV, hd)
        v_cache = torch.randn_like(k_cache)
        blocks = torch.randperm(k_cache.shape[0])[: batch * width]
        q = torch.randn(batch, H, 1, hd)
        lengths = torch.randint(context - 8, context + 1, (batch,))
        mask = (torch.arange(context)[None, :] < lengths[:, None]).view(batch, 1, 1, context)

        def gathered():
            keys = k_cache.index_select(0, blocks).view(batch, -1, KV, hd)[:, :context].transpose(1, 2)
            values = v_cache.index_select(0, blocks).view(batch, -1, KV, hd)[:, :context].transpose(1, 2)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != KV)

        out["attention gather only"] = _ms_per_call(lambda: (k_cache.index_select(0, blocks),
                                                             v_cache.index_select(0, blocks)))
        out["attention gather + sdpa"] = _ms_per_call(gathered)
        kc = torch.randn(batch, KV, context, hd)
        vc = torch.randn_like(kc)
        out["attention sdpa contiguous"] = _ms_per_call(
            lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=H != KV))
        qg, keep = q.view(batch, KV, H // KV, hd), mask.view(batch, 1, 1, context)

        def grouped():
            scores = (qg @ kc.transpose(-1, -2)) * hd ** -0.5
            return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vc

        out["attention grouped matmul contiguous"] = _ms_per_call(grouped)
    out["layers"] = cfg.num_hidden_layers
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--models", default="demo,200M", help="comma-separated: demo, 200M")
    ap.add_argument("--batches", default="1,16", help="running batch sizes to profile")
    ap.add_argument("--steps", type=int, default=100, help="decode steps timed per batch size")
    ap.add_argument("--engine-args", default="", help='extra `minicoder serve` flags, e.g. '
                    '--engine-args="--compile on" (write the = when the value starts with -)')
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the kernel checks")
    args = ap.parse_args()
    engine_args = split_flags(args.engine_args)
    engine_config(engine_args)
    run = Run("profile", args)
    peaks = probes()
    results = {"engine_args": engine_args, "probes": peaks, "models": {}}
    for m in prepare_models([s for s in args.models.split(",") if s]):
        entry = {"model": m.as_json(), "steps": {}, "cprofile": {}, "kernels": kernel_checks(m) if args.kernels else {}}
        for batch in (int(b) for b in args.batches.split(",") if b):
            p = profile_engine(m, batch, args.steps, engine_args)
            entry["steps"][str(batch)] = p
            entry["cprofile"][str(batch)] = cprofile_top(m, batch, max(args.steps // 2, 10), engine_args)
            print(f"  [{m.name}] batch {batch}: {p['step_ms']:.2f} ms/step, {p['aten_ops_per_step']} aten ops, "
                  f"forward {p['parts_ms'].get('forward', 0):.2f} ms", flush=True)
            gc.collect()
        results["models"][m.name] = entry
    run.save(results)


if __name__ == "__main__":
    main()
