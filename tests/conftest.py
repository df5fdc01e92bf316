"""Shared fixtures: a tiny corpus, tokenizer, packed dataset and model preset, built once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's `--compile auto` would spend minutes compiling each tiny test model's decode step: tests about
# compilation turn it on themselves.
os.environ.setdefault("MINICODER_COMPILE", "off")

TINY_PRESET = """
[model]
hidden_size = 64
intermediate_size = 160
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 128

[train]
seq_len = 32
batch_size = 4
max_steps = 8
lr = 3e-3
warmup_steps = 2
eval_interval = 4
eval_batches = 2
save_interval = 4
log_interval = 2
"""


SAMPLE_CODE = '''
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Greeter:
    def __init__(self, name: str = "wörld"):
        self.name = name

    def greet(self) -> str:
        return f"Hello, {self.name}! 你好 🙂"


if __name__ == "__main__":
    print(fibonacci(10), Greeter().greet())
'''


def save_tiny_tokenizer(path: Path) -> Path:
    """A 400-token byte-level BPE tokenizer (minicoder's special tokens and chat template) trained on SAMPLE_CODE."""
    from minicoder.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer([SAMPLE_CODE] * 20, vocab_size=400), path)
    return path


def save_tiny_llama(path: Path, context: int = 512, tie_word_embeddings: bool = False,
                    initializer_range: float = 0.02) -> Path:
    """A tiny random stock-transformers Llama with the tiny tokenizer, in one model directory. The default
    init predicts nearly uniformly; `initializer_range=0.3` gives peaked predictions (top token ~0.2, not
    1/400), so a logprob taken at the wrong position or from the wrong cache slot differs by far more than
    float error."""
    import transformers

    save_tiny_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(transformers.AutoTokenizer.from_pretrained(path)), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def save_peaked_llama(path: Path, context: int = 512, sharpness: float = 40.0) -> Path:
    """`save_tiny_llama` with confident predictions: lm_head and the query projections scaled up.

    A random tiny model is nearly uniform, so a cache bug moves its logits by too little to change a greedy
    token; here the top token typically carries most of the mass and attention is sharp, so reading one wrong
    cache slot moves the logprobs by far more than a float tolerance.
    """
    import transformers

    save_tiny_llama(path, context)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpness / 8)
    model.save_pretrained(path)
    return path


@contextlib.contextmanager
def uvicorn_in_thread(config):
    """Run a real uvicorn server (`config`: a uvicorn.Config) on a free loopback port in a thread; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy 2-core machine its barrier costs ms per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def serve_in_thread(app):
    """A real uvicorn server for `app` on a free port, in a thread; yields its base URL."""
    import uvicorn

    with uvicorn_in_thread(uvicorn.Config(app, log_level="warning")) as port:
        yield f"http://127.0.0.1:{port}"


def run_cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m minicoder ...` as a user would, capturing its output."""
    proc = subprocess.run([sys.executable, "-m", "minicoder", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"minicoder {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~60 standard-library modules as one-file repositories, in the corpus document format."""
    out = tmp_path_factory.mktemp("corpus")
    (out / "docs").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(out / "docs" / "shard-00000.jsonl", "w") as f:
        for path in sorted(stdlib.glob("*.py"))[:60]:
            text = path.read_text(encoding="utf-8", errors="replace")[:20000]
            f.write(json.dumps({"repo": f"stdlib/{path.stem}", "lang": "python", "paths": [path.name],
                                "text": f"# {path.name}\n{text}"}) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    run_cli("tokenizer", "train", "--corpus", str(tiny_corpus), "--out", str(out), "--vocab-size", "512", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_packed(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "data"
    run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out", str(out),
            "--val-fraction", "0.1", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY_PRESET)
    return path


@pytest.fixture(scope="session")
def tiny_trained(tiny_packed, tiny_preset, tmp_path_factory) -> Path:
    """A finished 8-step run (its final/ is a complete Hugging Face model directory)."""
    out = tmp_path_factory.mktemp("run") / "run"
    run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet", check=True)
    return out
