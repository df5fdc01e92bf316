"""The benchmark models and prompts, one builder for all scripts: the demo model (runs/demo/final, or a random
Llama of its shape when it is absent) where per-step overhead decides, and a ~200M random Llama where memory
bandwidth decides; their GGUF exports for llama.cpp; and minicoder engine settings from `minicoder serve` flags.

Models, the tokenizer and GGUF files are cached under build/serve_bench/ (git-ignored), keyed by their config.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import ROOT, WORK, fail

from minicoder.model import LlamaForCausalLM, ModelConfig

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

SHAPES = {
    "demo": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "200M": ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024),
}
NEW_TOKENS = {"demo": (128, 64), "200M": (48, 32)}  # output tokens per request: full run, --quick


def prompt_text(i: int) -> str:
    return f"# {i}: {TOPICS[i % len(TOPICS)]} (variant {i // len(TOPICS)})\n" + SNIPPET


@dataclass
class BenchModel:
    name: str  # "demo" or "200M"
    path: Path
    params: int
    weight_bytes: int  # fp32 bytes read per decode step (all matmul weights + lm_head)
    new_tokens: int  # fixed output length of every request
    note: str = ""
    prompt_tokens: tuple[int, int] = (0, 0)  # min, max over the benchmark's prompts
    ggufs: dict[str, Path] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


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


def ensure_tokenizer(work: Path = WORK) -> Path:
    from minicoder.tokenizer import save_tokenizer, train_tokenizer

    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        save_tokenizer(train_tokenizer(tokenizer_texts(), vocab_size=4096), out)
    return out


def ensure_random_llama(out: Path, config: ModelConfig, tokenizer_dir: Path) -> Path:
    """A randomly initialised (seed 0) Llama checkpoint with the given config and tokenizer, rebuilt when the
    config changes."""
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
    """(parameters, fp32 bytes of weights read per decode step)."""
    cfg = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    read = L * (2 * h * h + 2 * h * kv + 3 * h * f) + cfg.vocab_size * h  # lm_head; embedding rows are 1 each
    return cfg.num_parameters(), 4 * read


def model_path(name: str) -> tuple[Path, str]:
    """The checkpoint for a benchmark model name, and how it was made."""
    if name not in SHAPES:
        fail(f"--models: unknown model {name!r} (known: {', '.join(SHAPES)})")
    demo = ROOT / "runs" / "demo" / "final"
    if name == "demo" and (demo / "config.json").is_file() and (demo / "tokenizer.json").is_file():
        return demo, "runs/demo/final (trained demo checkpoint)"
    cfg = SHAPES[name]
    path = ensure_random_llama(WORK / ("demo-random" if name == "demo" else "llama-200m-random"), cfg,
                               ensure_tokenizer())
    if name == "demo":
        return path, "random Llama of the nano shape (runs/demo/final absent at run time)"
    return path, (f"random Llama, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                  f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, intermediate "
                  f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, tied")


def prepare_models(names: list[str], quick: bool = False, new_tokens: int = 0,
                   gguf_types: tuple[str, ...] = ()) -> list[BenchModel]:
    WORK.mkdir(parents=True, exist_ok=True)
    models = []
    for name in names:
        path, note = model_path(name)
        params, weight_bytes = model_stats(path)
        m = BenchModel(name, path, params, weight_bytes, new_tokens or NEW_TOKENS[name][quick], note)
        tok = _tokenizer(path)
        lengths = [len(tok(prompt_text(i))["input_ids"]) for i in range(2000)]
        m.prompt_tokens = (min(lengths), max(lengths))
        for qtype in gguf_types:
            m.ggufs[qtype] = ensure_gguf(path, name, qtype)
        models.append(m)
        print(f"model {name}: {params / 1e6:.1f}M params, {path}", flush=True)
    return models


@functools.cache
def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def prompt_ids(m: BenchModel, i: int = 0) -> list[int]:
    return _tokenizer(m.path)(prompt_text(i))["input_ids"]


# --- minicoder engine settings from `minicoder serve` flags ------------------------------------------------

def split_flags(text: str) -> list[str]:
    """--engine-args "--compile on" (or --vllm-args) -> a flag list, passed to the server as is."""
    return shlex.split(text or "")


def engine_config(flags: list[str]):
    """The EngineConfig that `minicoder serve MODEL FLAGS...` would build, parsed by serve's own parser (so a
    flag that serve gains later works here unchanged; the last occurrence of a flag wins, as on a command line).
    A flag that changes only the HTTP server, not the engine, is an error rather than silently ignored."""
    from minicoder.engine import EngineConfig
    from minicoder.server.cli import configure_serve_parser

    parser = argparse.ArgumentParser(prog="minicoder serve (--engine-args)")
    configure_serve_parser(parser)
    given, defaults = parser.parse_args(["MODEL", *flags]), parser.parse_args(["MODEL"])
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {}
    for key, value in vars(given).items():
        if key in fields:
            kwargs[key] = value
        elif key == "kv_cache_gb":
            kwargs["kv_cache_bytes"] = int(value * (1 << 30))
        elif value != getattr(defaults, key):
            fail(f"--engine-args: --{key.replace('_', '-')} has no engine setting (EngineConfig has no field "
                 f"{key!r}): it cannot be measured in process")
    return EngineConfig(**kwargs)
