"""Raw benchmark JSON -> the tables of docs/benchmarks.md. Only the regions between marker comments are
written; everything else in the document (the readings, written by hand) is never touched:

    <!-- BEGIN benchmarks/render.py: serving -->
    ...tables rendered from the newest runs/bench/serving-*.json...
    <!-- END benchmarks/render.py: serving -->

  .venv/bin/python benchmarks/render.py                        # newest results of each benchmark in runs/bench/
  .venv/bin/python benchmarks/render.py --results DIR --only decode,serving --doc docs/benchmarks.md

Tables hold numbers only (and the ratios the aims ask for); no sentence here depends on what was measured.
A benchmark whose region the document lacks gets a new section at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCHMARKS = {"decode": "Decode at batch 1", "serving": "Concurrent streaming clients",
              "profile": "Where minicoder's time goes", "train": "Training throughput",
              "quality": "Compression: quality and size", "editor": "Editor session"}
SCRIPTS = {"decode": "decode_bench.py", "serving": "serving_bench.py", "profile": "profile_bench.py",
           "train": "train_throughput.py", "quality": "quant_quality.py", "editor": "editor_session.py"}
BUSY = 0.15  # the share of other processes' CPU above which a figure gets a dagger (common.BUSY)


def begin(name: str) -> str:
    return f"<!-- BEGIN benchmarks/render.py: {name} -->"


def end(name: str) -> str:
    return f"<!-- END benchmarks/render.py: {name} -->"


def newest(results: Path, name: str) -> dict | None:
    files = sorted(results.glob(f"{name}-*.json"))  # names end in a UTC timestamp: the last is the newest
    return json.loads(files[-1].read_text()) if files else None


def table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def num(v, fmt: str = ",.1f", dagger: bool = False) -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return format(v, fmt) + (" †" if dagger else "")


def ratio_table(models: dict) -> list[str]:
    """One row per ratio, one column per model ("-" where that model has no such ratio)."""
    names = list(dict.fromkeys(k for e in models.values() for k in e["ratios"]))
    if not names:
        return []
    return table(["ratio"] + list(models), [[k] + [f"{e['ratios'][k]:.2f}x" if e["ratios"].get(k) else "-"
                                                   for e in models.values()] for k in names])


def header(data: dict) -> list[str]:
    m, v = data["machine"], data["versions"]
    load = m["load_average"][0]
    command = " ".join([f"benchmarks/{SCRIPTS[data['benchmark']]}", *data["argv"]])
    return [f"`{command}`, {data['started']}, {data['elapsed_s'] / 60:.1f} min.  ",
            f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or '-'}, bf16 in hardware "
            f"{'yes' if m['fast_bf16'] else 'no'}, {m.get('memory_gb') or '?'} GB; load average at start "
            f"{load:.2f}{'' if data['quiet_at_start'] else ' (not quiet: figures not comparable)'}.  ",
            "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]


def models_list(models: dict) -> list[str]:
    out = []
    for name, entry in models.items():
        m = entry["model"]
        out.append(f"- **{name}**: {m['params'] / 1e6:.1f}M parameters, {m['note']}; "
                   f"{entry.get('new_tokens', m['new_tokens'])} output tokens per request, prompts of "
                   f"{m['prompt_tokens'][0]}-{m['prompt_tokens'][1]} tokens; {m['weight_bytes'] / 1e6:,.0f} MB of "
                   f"fp32 weights read per decode step.")
    return out + [""]


def render_decode(d: dict) -> list[str]:
    r = d["results"]
    models = r["models"]
    lines = header(d) + models_list(models)
    lines.append(f"Tokens/s, best of {r['repeats']} after a warm-up, {r['threads']} threads, greedy, batch 1"
                 + (f"; minicoder with `{' '.join(r['engine_args'])}`" if r["engine_args"] else "") + ". † other "
                 f"processes used over {100 * BUSY:.0f}% of the CPU during that figure.")
    lines.append("")
    systems = list(dict.fromkeys(run["system"] for e in models.values() for run in e["runs"]))
    rows = []
    for s in systems:
        row = [s]
        for e in models.values():
            run = next((x for x in e["runs"] if x["system"] == s), None)
            row.append(num(run and run["tok_s"], dagger=bool(run and run.get("foreign_load", 0) > BUSY)))
            row.append(num(run.get("weight_bytes") / 1e6, ",.0f") if run and run.get("weight_bytes") else "-")
        rows.append(row)
    cols = ["system"] + [c for name in models for c in (f"{name} tok/s", f"{name} weights MB")]
    lines += table(cols, rows) + [""]
    lines += ratio_table(models)
    lines.append("")
    for name, e in models.items():
        same = ", ".join(f"{s} {a}/{b}" for s, (a, b) in e["greedy_match_vs_minicoder_fp32"].items())
        if same:
            lines.append(f"Greedy tokens equal to minicoder fp32's, leading run ({name}, {e['new_tokens']} tokens): {same}.")
    repack = {x["format"]: x["repack"] for e in models.values() for x in e["runs"] if "repack" in x}
    off = sorted(q for q, on in repack.items() if not on)
    if off:
        lines.append(f"llama.cpp without CPU weight repacking for {', '.join(off)} (`--llama-repack` turns it on).")
    return lines


def fmt_ms(v) -> str:
    return "-" if v is None or v != v else (f"{v:,.1f}" if v < 1000 else f"{v:,.0f}")


def render_serving(d: dict) -> list[str]:
    r = d["results"]
    lines = header(d) + models_list(r["models"])
    lines.append(f"{r['threads']} threads per system, one system at a time, {r['requests_per_client']} requests per "
                 "client per level after an unmeasured warm-up; clients are asyncio + httpx in the benchmark "
                 "process. TTFT: request sent to first streamed token; TPOT: (last - first token) / (tokens - 1); "
                 "tok/s: all output tokens / wall time of the level"
                 + (f"; minicoder with `{' '.join(r['engine_args'])}`" if r["engine_args"] else "") + ".")
    if r.get("skipped"):
        lines.append("Not measured: " + "; ".join(f"{s} ({why})" for s, why in r["skipped"].items()) + ".")
    lines.append("")
    rows = []
    for name, e in r["models"].items():
        for c in e["cells"]:
            if c["error"]:
                rows.append([name, c["system"], c.get("clients") or "-", c.get("requests", "-"),
                             f"failed: {c['error'][:120]}", "", "", "", ""])
                continue
            rows.append([name, c["system"], c["clients"], f"{c['requests']}{'*' if c['note'] else ''}",
                         fmt_ms(c["ttft_p50_ms"]), fmt_ms(c["ttft_p99_ms"]), fmt_ms(c["tpot_p50_ms"]),
                         fmt_ms(c["tpot_p99_ms"]), num(c["tok_s"], dagger=c["foreign_load"] > BUSY)])
    lines += table(["model", "system", "clients", "requests", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                    "TPOT p99 ms", "output tok/s"], rows, "llrrrrrrr")
    if any(c.get("note") for e in r["models"].values() for c in e["cells"]):
        lines += ["", "\\* one request per client (the baseline script serves one request at a time)."]
    lines.append("")
    lines += ratio_table(r["models"])
    same = [f"{name}: {k} {'same' if v else 'different'}" for name, e in r["models"].items()
            for k, v in e["same_text_at_1_client"].items()]
    if same:
        lines += ["", "Greedy text of the first 1-client request: " + "; ".join(same) + "."]
    return lines


def render_profile(d: dict) -> list[str]:
    r = d["results"]
    p = r["probes"]
    lines = header(d) + [
        f"Probes: memory read {p['memory_read_gbps']:.1f} GB/s; matmul fp32 {p['matmul_fp32_2048_gflops']:.0f} "
        f"GFLOP/s at 2048³, {p['matmul_fp32_16x1024x3072_gflops']:.0f} at 16x1024x3072; bf16 "
        f"{p['matmul_bf16_2048_gflops']:.0f} and {p['matmul_bf16_16x1024x3072_gflops']:.0f}"
        + (f"; minicoder with `{' '.join(r['engine_args'])}`" if r["engine_args"] else "") + ".", ""]
    rows = []
    for name, e in r["models"].items():
        wb = e["model"]["weight_bytes"]
        for batch, s in e["steps"].items():
            g = s["parts_ms"].get
            floor = wb / (p["memory_read_gbps"] * 1e9) * 1e3
            ops = ", ".join(f"{k.removeprefix('aten::')} {v:.0f}%" for k, v in s["top_aten_ops_pct"][:5])
            rows.append([name, batch, f"{s['step_ms']:.2f}", f"{int(batch) / s['step_ms'] * 1e3:,.0f}",
                         *(f"{g(k, 0):.2f}" for k in ("forward", "sampler", "scheduler", "append token + detokenize",
                                                      "other")),
                         s["aten_ops_per_step"], f"{s['prefill_ms_per_prompt_token']:.2f}", f"{floor:.2f}",
                         f"{100 * s['attention_share']:.0f}%", f"{100 * s['matmul_share']:.0f}%", ops])
    lines += table(["model", "batch", "step ms", "tok/s", "forward", "sampler", "scheduler", "append+detok", "other",
                    "aten ops/step", "prefill ms/prompt token", "weights at probe bandwidth ms", "attention (sdpa + "
                    "index_select)", "matmul", "top aten ops (% self CPU)"], rows, "lrrrrrrrrrrrrrl") + [""]
    for name, e in r["models"].items():
        for batch, top in e["cprofile"].items():
            lines.append(f"cProfile, {name}, batch {batch} (ms per step, cumulative / own): " + "; ".join(
                f"`{fn}` {ct:.2f}/{tt:.2f}" for fn, tt, ct in top[:10]) + ".")
            lines.append("")
    kern = {name: e["kernels"] for name, e in r["models"].items() if e["kernels"]}
    if kern:
        lines += ["Kernel checks, one layer of each model (ms per call; attention at batch 16, context 200):", ""]
        lines += table(["model", "gate/up `x @ W` M=1 / M=16", "oneDNN prepacked M=1 / M=16", "bf16 weights M=1 / M=16",
                        "attention: gather + SDPA on strided views", "the gather alone", "SDPA, contiguous K/V",
                        "grouped matmul, contiguous K/V"],
                       [[name, f"{k['matmul x@W M=1']:.2f} / {k['matmul x@W M=16']:.2f}",
                         f"{k['matmul prepacked M=1']:.2f} / {k['matmul prepacked M=16']:.2f}",
                         f"{k['matmul bf16 M=1']:.2f} / {k['matmul bf16 M=16']:.2f}",
                         f"{k['attention gather + sdpa']:.2f}", f"{k['attention gather only']:.2f}",
                         f"{k['attention sdpa contiguous']:.2f}", f"{k['attention grouped matmul contiguous']:.2f}"]
                        for name, k in kern.items()])
    return lines


def render_train(d: dict) -> list[str]:
    r = d["results"]
    peak = r["matmul_peak_gflops"]
    lines = header(d) + [
        f"Model: {r['config']}, {r['params'] / 1e6:.2f}M parameters, batch {r['batch_size']}x{r['seq_len']}, "
        f"accumulation {r['grad_accum']}, {r['dtype']}; {r['flops_per_token'] / 1e6:.1f} MFLOP per token (6N + "
        f"attention). Matmul rate at 2048³ in this run: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f}. "
        f"Best of {r['rounds']} alternating rounds, median step of {r['steps']}.", ""]
    lines += table(["loop", "tokens/s", "GFLOP/s", "% of fp32 matmul rate", "% of bf16 matmul rate"],
                   [[x["loop"], num(x["tokens_per_s"], ",.0f"), num(x["gflops"]), f"{x['pct_of_fp32_peak']:.0f}%",
                     f"{x['pct_of_bf16_peak']:.0f}%"] for x in r["loops"]]) + [""]
    lines += table(["ratio", "value"], [[k, f"{v:.2f}x"] for k, v in r["ratios"].items()])
    return lines


def render_quality(d: dict) -> list[str]:
    r = d["results"]
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"  # noqa: E731
    lines = header(d) + [
        f"Model {r['model']}, held-out data {r['data']} ({r['formats'][0]['windows']} windows of its validation "
        "split). Bits per byte of the held-out repositories (lower is better); weights on disk = the model "
        "directory's safetensors; resident = what the serving engine holds (fused, packed for this CPU's kernels); "
        "KV bytes per token over all layers.", ""]
    lines += table(["format", "bits/byte", "vs fp32", "weights on disk (MB)", "resident (MB)", "KV bytes/token", "notes"],
                   [[f["format"], f"{f['bits_per_byte']:.4f}", f"{f['vs_fp32_pct']:+.2f}%", mb(f["disk_bytes"]),
                     mb(f["resident_bytes"]), f"{f['kv_bytes_per_token']:,}", f["note"]] for f in r["formats"]],
                   "lrrrrrl")
    errors = r["awq_layer_errors"]
    lines += ["", f"AWQ vs RTN calibration output error: lower in {sum(g['awq_mse'] < g['rtn_mse'] for g in errors)} "
              f"of {len(errors)} Linear groups; total MSE {sum(g['awq_mse'] for g in errors):.3g} (AWQ) vs "
              f"{sum(g['rtn_mse'] for g in errors):.3g} (RTN)."]
    return lines


def render_editor(d: dict) -> list[str]:
    r = d["results"]
    lines = header(d) + [f"Model {r['model']}; {r['requests']} keystrokes, {r['n_predict']} tokens each, context "
                         f"{r['ctx']}, repository context budget {r['context_tokens']} tokens, {r['threads']} threads.", ""]
    llama = next((s for s in r["sessions"] if s["system"].startswith("llama-server") and s["ttfts"]), None)
    rows = [[s["system"], f"{len(s['ttfts'])} ({s['failures']} failed)", fmt_ms(s["ttft_p50_ms"]),
             fmt_ms(s["ttft_p99_ms"]), f"{100 * s['hit_rate']:.1f}%",
             f"{s['ttft_p50_ms'] / llama['ttft_p50_ms']:.2f}x" if llama and s["ttfts"] else "-"] for s in r["sessions"]]
    return lines + table(["system", "requests", "TTFT p50 ms", "TTFT p99 ms", "prefix-cache hit rate",
                          "TTFT p50 vs llama-server"], rows)


RENDERERS = {"decode": render_decode, "serving": render_serving, "profile": render_profile, "train": render_train,
             "quality": render_quality, "editor": render_editor}


def render(results: Path, doc: Path, only: list[str] | None = None) -> list[str]:
    """Fill the regions of `doc` from the newest results in `results`; returns the benchmarks rendered."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    done = []
    for name in only or list(BENCHMARKS):
        data = newest(results, name)
        if data is None:
            print(f"render: no {name}-*.json in {results}: its region is left as it is")
            continue
        body = "\n".join(RENDERERS[name](data)).rstrip("\n")
        block = f"{begin(name)}\n{body}\n{end(name)}"
        a, b = text.find(begin(name)), text.find(end(name))
        if a >= 0 and b > a:
            text = text[:a] + block + text[b + len(end(name)):]
        else:
            text = text.rstrip("\n") + f"\n\n## {BENCHMARKS[name]}\n\n{block}\n"
            print(f"render: {doc} had no {name} region: added a section at its end")
        done.append(name)
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)
    print(f"render: {', '.join(done) or 'nothing'} -> {doc}")
    return done


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "bench",
                    help="directory of the benchmarks' JSON files (default runs/bench/)")
    ap.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    ap.add_argument("--only", default="", help=f"comma-separated: {', '.join(BENCHMARKS)} (default: all)")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s] or None
    if only and (bad := [s for s in only if s not in BENCHMARKS]):
        fail(f"--only: unknown {', '.join(bad)} (known: {', '.join(BENCHMARKS)})")
    if not args.results.is_dir():
        fail(f"--results {args.results}: not a directory (run a benchmark first)")
    render(args.results, args.doc, only)


if __name__ == "__main__":
    main()
