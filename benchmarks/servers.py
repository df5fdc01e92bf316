"""Servers under test and the streaming load generator: a server subprocess in its own process group
(stopped with its children, also on errors and Ctrl-C), and N asyncio + httpx clients streaming
`/v1/completions` (or the baseline script's `/stream`), timing TTFT and time per output token per request.
The same client measures every system.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import ROOT, measured
from models import prompt_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group; stopped (group killed) on exit, also on errors."""

    def __init__(self, name: str, cmd: list[str], port: int, health: str, env: dict | None = None,
                 log_dir: Path | None = None, ready_timeout: float = 240):
        self.name, self.cmd, self.port, self.health = name, cmd, port, health
        self.env = {**os.environ, **(env or {})}
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{name.replace(' ', '_')}-{port}.log"
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0  # seconds from start to the first healthy answer

    def __enter__(self):
        self.log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=ROOT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def _wait_ready(self):
        import httpx

        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout:.0f} s; log: {self.log_path}")

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
        # the group may hold children that outlived the leader (vLLM's engine core, uvicorn workers)
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
    """One system at one concurrency level."""
    system: str
    clients: int
    requests: int
    wall: float
    stats: list[RequestStat] = field(default_factory=list)
    note: str = ""
    foreign_load: float = 0.0
    error: str = ""
    first_text: str = ""  # the first request's streamed text (same prompt, greedy: comparable across systems)

    @property
    def tok_s(self) -> float:
        return sum(s.tokens for s in self.stats) / self.wall if self.stats else 0.0

    def pct(self, attr: str, q: float) -> float:
        return float(np.percentile([getattr(s, attr) for s in self.stats], q)) if self.stats else float("nan")

    def summary(self) -> dict:
        """What the JSON keeps besides the per-request stats."""
        return {"tok_s": self.tok_s, **{f"{a}_p{q}_ms": self.pct(a, q) * 1e3 for a in ("ttft", "tpot")
                                        for q in (50, 99)}}


async def _openai_stream(client, url: str, body: dict, n: int) -> tuple[RequestStat, str]:
    t0 = time.perf_counter()
    first = last = None
    tokens, text = None, []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
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
                text.append(chunk["choices"][0].get("text") or "")
    tokens = tokens if tokens is not None else n
    if tokens != n or first is None:
        raise RuntimeError(f"{url}: {tokens} tokens generated, {n} asked for")
    return RequestStat(first - t0, (last - first) / max(tokens - 1, 1), tokens, last - t0), "".join(text)


async def _baseline_stream(client, url: str, body: dict, n: int) -> tuple[RequestStat, str]:
    t0 = time.perf_counter()
    times, text = [], []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if line[6:] == "[DONE]":
                    break
                times.append(time.perf_counter())
                text.append(line[6:])
    if len(times) != n:
        raise RuntimeError(f"{url}: {len(times)} tokens streamed, {n} asked for")
    return RequestStat(times[0] - t0, (times[-1] - times[0]) / max(n - 1, 1), n, times[-1] - t0), "".join(text)


def request_factory(kind: str, port: int, n: int, model: str = "bench"):
    """(url, body for prompt i, streaming reader) of one system's protocol: "openai" (minicoder, vLLM),
    "llama" (llama-server: OpenAI route, no prompt cache between a slot's requests) or "baseline"."""
    if kind == "baseline":
        def body(i):
            return {"prompt": prompt_text(i), "history": [], "max_length": n, "min_new_tokens": n,
                    "do_sample": False, "repetition_penalty": 1.0}
        return f"http://127.0.0.1:{port}/stream", body, _baseline_stream

    def body(i):
        b = {"model": model, "prompt": prompt_text(i), "max_tokens": n, "temperature": 0, "stream": True,
             "ignore_eos": True, "stream_options": {"include_usage": True}}
        if kind == "llama":
            b.pop("model")
            b["cache_prompt"] = False  # prompts are distinct anyway; no reuse from a slot's previous request
        return b
    return f"http://127.0.0.1:{port}/v1/completions", body, _openai_stream


async def _load(kind: str, port: int, n: int, clients: int, requests: int, first_index: int,
                timeout: float, model: str) -> tuple[float, list[RequestStat], str]:
    import httpx

    url, body, reader = request_factory(kind, port, n, model)
    todo = iter(range(first_index, first_index + requests))
    stats: list[RequestStat] = []
    texts: dict[int, str] = {}

    async def client_loop(client):
        for i in todo:
            stat, texts[i] = await reader(client, url, body(i), n)
            stats.append(stat)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), timeout)
        return time.perf_counter() - t0, stats, texts.get(first_index, "")


def measure_level(kind: str, system: str, server: Server, new_tokens: int, clients: int, requests: int,
                  timeout: float, retries: int, note: str = "", model: str = "bench", label: str = "") -> Cell:
    """One level: an unmeasured warm-up of `clients` short requests (the serial baseline: one), then
    `requests` requests of `new_tokens` tokens from `clients` concurrent streaming clients. A failed or
    timed-out level is reported in the Cell, the run goes on."""
    def level():
        warm = 1 if kind == "baseline" else clients
        asyncio.run(_load(kind, server.port, 4, warm, warm, 10_000, timeout, model))
        return asyncio.run(_load(kind, server.port, new_tokens, clients, requests, 100 * clients, timeout, model))

    try:
        (wall, stats, text), load = measured(level, retries, [server.proc.pid])
    except Exception as e:
        print(f"  [{label}] {system}, {clients} clients: FAILED: {e!r}", flush=True)
        return Cell(system, clients, requests, 0.0, [], note, error=f"{type(e).__name__}: {e}"[:300])
    cell = Cell(system, clients, requests, wall, stats, note, load, first_text=text)
    print(f"  [{label}] {system}, {clients} clients, {requests} requests x {new_tokens} tokens: "
          f"{cell.tok_s:,.1f} tok/s, TTFT p50 {cell.pct('ttft', 50) * 1e3:,.0f} ms, "
          f"TPOT p50 {cell.pct('tpot', 50) * 1e3:,.1f} ms ({wall:.1f} s)", flush=True)
    return cell
