"""Editor-session benchmark: 30 successive `/infill` requests as a user types in one file, with repository
context, against `minicoder serve` and llama.cpp's `llama-server` on the same model.

The session is what llama.vim does: a cache warm-up request (`n_predict: 0`) carrying the repository
context, then one request per keystroke while the user types new lines into a file of minicoder's own
sources (256 lines of prefix, 64 of suffix, the line being typed as `prompt`). Repository context is the
same for every system: the file's most relevant chunks of the rest of the package (BM25, minicoder's
`RepoIndex`), sent as `input_extra`. A third run lets `minicoder serve --repo` pick them server-side.
Each request streams (greedy, `ignore_eos`, `n_predict` tokens); TTFT is measured by the client up to the
first streamed content. Prefix-cache hit rate = 1 - (prompt tokens computed) / (prompt tokens), from each
answer's `timings.prompt_n` and `tokens_evaluated`, the same fields on both servers.

  .venv/bin/python benchmarks/editor_session.py                      # needs benchmarks/setup_llamacpp.sh first
  .venv/bin/python benchmarks/editor_session.py --requests 5 --no-llama-server    # a smoke test

Aim: minicoder's TTFT p50 at most 0.5x llama-server's. Models and GGUF files are cached under build/serve_bench/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import LLAMA_BIN, PY, WORK, Run, add_common_args  # noqa: E402
from models import SHAPES, ensure_gguf, ensure_random_llama, ensure_tokenizer  # noqa: E402
from servers import Server, free_port  # noqa: E402

from minicoder.server.repo_index import RepoIndex  # noqa: E402

AIM = 0.5  # minicoder TTFT p50 <= 0.5x llama-server's
EDITED_FILE = "src/minicoder/server/app.py"  # the file the user types into
TYPED = '''    def cached_prompt_tokens(self, generation: Generation) -> int:
        prompt, completion, cached = generation.usage()
        return cached
'''


@dataclass
class Session:
    system: str
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    computed_tokens: int = 0
    failures: int = 0

    @property
    def hit_rate(self) -> float:
        return 1 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.ttfts)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def keystrokes(n: int) -> list[tuple[str, str, str]]:
    """(input_prefix, prompt, input_suffix) of n successive keystrokes typing TYPED into EDITED_FILE."""
    lines = (ROOT / EDITED_FILE).read_text().splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith("    # --- prompts and parameters")),
              len(lines) // 2)
    before, after = lines[:at], lines[at:]
    out, typed = [], ""
    for ch in TYPED:
        typed += ch
        done, current = typed[: typed.rfind("\n") + 1], typed[typed.rfind("\n") + 1 :]
        prefix = "".join((before + done.splitlines(keepends=True))[-256:])
        out.append((prefix, current, "\n" + "".join(after[:64])))
        if len(out) == n:
            break
    return out


def repo_context(index: RepoIndex, prefix: str, budget: int) -> list[dict]:
    return [{"filename": path, "text": text} for path, text in index.snippets(prefix, EDITED_FILE, budget)]


def run_session(system: str, port: int, steps, extra: list[dict] | None, n_predict: int, timeout: float) -> Session:
    import httpx

    session = Session(system)
    url = f"http://127.0.0.1:{port}/infill"
    with httpx.Client(timeout=timeout) as client:
        client.post(url, json={"input_prefix": "", "input_suffix": "", "input_extra": extra or [], "prompt": "",
                               "n_predict": 0, "samplers": [], "cache_prompt": True}).raise_for_status()
        for prefix, prompt, suffix in steps:
            body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra or [], "prompt": prompt,
                    "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "stream": True,
                    "cache_prompt": True, "samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99}
            start, ttft, last = time.perf_counter(), None, None
            with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    session.failures += 1
                    print(f"  {system}: HTTP {r.status_code}: {r.read()[:300]!r}", flush=True)
                    continue
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if ttft is None and (event.get("content") or event.get("stop")):
                        ttft = time.perf_counter() - start
                    if event.get("stop"):
                        last = event
            if last is None or ttft is None:
                session.failures += 1
                continue
            session.ttfts.append(ttft)
            session.prompt_tokens += last["tokens_evaluated"]
            session.computed_tokens += last["timings"]["prompt_n"]
    return session


def prepare_model(args) -> Path:
    demo = ROOT / "runs" / "demo" / "final"
    if not args.random and (demo / "config.json").is_file() and (demo / "tokenizer.json").is_file():
        return demo
    cfg = dataclasses.replace(SHAPES["demo"], max_position_embeddings=2048)
    return ensure_random_llama(WORK / "editor-random", cfg, ensure_tokenizer(WORK))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30, help="keystrokes (requests) in the session (default 30)")
    ap.add_argument("--n-predict", type=int, default=16, help="tokens per completion (default 16)")
    ap.add_argument("--context-tokens", type=int, default=512, help="repository context budget (default 512)")
    ap.add_argument("--ctx", type=int, default=2048, help="context length of both servers (default 2048)")
    ap.add_argument("--qtype", default="f32", help="llama-server's GGUF type (default f32, minicoder's dtype)")
    ap.add_argument("--random", action="store_true", help="a random Llama of the nano shape even if runs/demo exists")
    ap.add_argument("--no-llama-server", action="store_true", help="minicoder only (smoke test)")
    add_common_args(ap)
    args = ap.parse_args()
    run = Run("editor", args)

    WORK.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    index = RepoIndex(ROOT / "src" / "minicoder", lambda s: len(tok.encode(s, add_special_tokens=False)))
    steps = keystrokes(args.requests)
    extra = repo_context(index, steps[0][0], args.context_tokens)
    print(f"model {model}; {len(steps)} keystrokes in {EDITED_FILE}; {len(extra)} context chunks "
          f"({sum(len(tok.encode(e['text'])) for e in extra)} tokens)", flush=True)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    timeout = 300.0
    sessions = []
    serve = [PY, "-m", "minicoder", "serve", str(model), "--max-model-len", str(args.ctx), "--log-level", "warning"]
    port = free_port()
    with Server("minicoder", serve + ["--port", str(port)], port, "/health", env):
        sessions.append(run_session("minicoder serve (input_extra)", port, steps, extra, args.n_predict, timeout))
    port = free_port()
    repo_cmd = serve + ["--port", str(port), "--repo", str(ROOT / "src" / "minicoder"),
                        "--repo-context-tokens", str(args.context_tokens)]
    with Server("minicoder-repo", repo_cmd, port, "/health", env):
        sessions.append(run_session("minicoder serve --repo", port, steps, None, args.n_predict, timeout))
    exe = LLAMA_BIN / "llama-server"
    if not args.no_llama_server:
        if not exe.is_file():
            sys.exit(f"error: {exe} not found: run benchmarks/setup_llamacpp.sh (or pass --no-llama-server)")
        gguf = ensure_gguf(model, "editor", args.qtype)
        port = free_port()
        cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(args.ctx), "-np", "1",
               "--threads", str(args.threads), "--threads-batch", str(args.threads)]
        with Server("llama-server", cmd, port, "/health", env):
            sessions.append(run_session(f"llama-server ({args.qtype})", port, steps, extra, args.n_predict, timeout))

    llama = next((s for s in sessions if s.system.startswith("llama-server")), None)
    print(f"\n| system | requests | TTFT p50 | TTFT p99 | TTFT mean | prefix-cache hit rate | p50 vs llama-server |")
    print("|---|---|---|---|---|---|---|")
    for s in sessions:
        ratio = f"{s.percentile(0.5) / llama.percentile(0.5):.2f}x" if llama and llama.ttfts and s.ttfts else "-"
        mean = statistics.mean(s.ttfts) * 1000 if s.ttfts else float("nan")
        print(f"| {s.system} | {len(s.ttfts)} ({s.failures} failed) | {s.percentile(0.5) * 1000:.1f} ms | "
              f"{s.percentile(0.99) * 1000:.1f} ms | {mean:.1f} ms | {s.hit_rate:.1%} | {ratio} |")
    if llama and llama.ttfts and sessions[0].ttfts:
        ratio = sessions[0].percentile(0.5) / llama.percentile(0.5)
        print(f"\naim: TTFT p50 <= {AIM}x llama-server's: {'met' if ratio <= AIM else 'missed'} ({ratio:.2f}x)")
    run.save({"model": str(model), "requests": args.requests, "n_predict": args.n_predict, "ctx": args.ctx,
              "context_tokens": args.context_tokens, "qtype": args.qtype, "threads": args.threads,
              "sessions": [{**s.__dict__, "hit_rate": s.hit_rate, "ttft_p50_ms": s.percentile(0.5) * 1e3,
                            "ttft_p99_ms": s.percentile(0.99) * 1e3} for s in sessions]})


if __name__ == "__main__":
    main()
