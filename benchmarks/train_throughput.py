"""Training throughput: `minicoder pretrain` against a plain PyTorch loop over transformers' LlamaForCausalLM.

Both train the same Llama config on the same batches with the same optimizer settings and dtype, in this one
process, alternating so that background load hits both alike. Also measures this CPU's peak fp32 and bf16
matmul throughput, to say how much of the machine each loop uses. Writes docs/benchmarks.md (training section).

  .venv/bin/python benchmarks/train_throughput.py [--config configs/nano.toml] [--steps 20] [--dtype auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from minicoder.config import load_config  # noqa: E402
from minicoder.train.loop import autocast_dtype, train  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def fake_packed_data(out: Path, vocab: int, tokens: int):
    """Random token shards in minicoder's packed format (throughput does not depend on the text)."""
    from minicoder.tokenizer import save_tokenizer, train_tokenizer

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, tokens, dtype=np.uint16).tofile(out / "train-00000.bin")
    words = [f"w{i} " for i in range(4000)]
    tok = train_tokenizer(("".join(rng.choice(words, 200)) for _ in range(400)), vocab_size=vocab)
    save_tokenizer(tok, out / "tokenizer")
    vocab = tok.get_vocab_size()
    meta = {"vocab_size": vocab, "dtype": "uint16", "splits": {"train": {"shards": ["train-00000.bin"], "tokens": tokens}}}
    (out / "meta.json").write_text(json.dumps(meta))
    return vocab


def minicoder_tokens_per_s(model_cfg, train_cfg, data: Path, steps: int, warmup: int) -> float:
    out = Path(tempfile.mkdtemp())
    try:
        train_cfg.max_steps, train_cfg.save_interval, train_cfg.eval_interval = warmup + steps, 10**9, 10**9
        train_cfg.log_interval = 10**9
        train(model_cfg, train_cfg, data, out / "run", progress=False)
        log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
        return float(np.median([r["tokens_per_s"] for r in log[warmup:]]))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def transformers_tokens_per_s(model_cfg, train_cfg, vocab: int, steps: int, warmup: int, amp, fused_adamw=False) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in model_cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    cfg.vocab_size = vocab
    torch.manual_seed(train_cfg.seed)
    model = LlamaForCausalLM(cfg).train()
    # The plain loop uses what a user writes, the default AdamW; the second variant shows what the fused
    # optimizer kernel (which minicoder uses) is worth on its own.
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                            weight_decay=train_cfg.weight_decay, fused=fused_adamw or None)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        for _ in range(train_cfg.grad_accum):
            batch = torch.from_numpy(rng.integers(0, vocab, (train_cfg.batch_size, train_cfg.seq_len + 1)))
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1)) / train_cfg.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens = train_cfg.batch_size * train_cfg.grad_accum * train_cfg.seq_len
    return float(np.median([tokens / t for t in times[warmup:]]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "nano.toml"))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two loops this many times")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="also measure minicoder with torch.compile")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()

    model_cfg, train_cfg = load_config(args.config, ["--dtype", args.dtype])
    amp = autocast_dtype(train_cfg.dtype, torch.device("cpu"))
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    work = Path(tempfile.mkdtemp())
    try:
        vocab = fake_packed_data(work / "data", args.vocab_size, 2_000_000)
        model_cfg.vocab_size = vocab
        flops_per_token = model_cfg.flops_per_token(train_cfg.seq_len)
        ours, ours_compiled, theirs, theirs_fused = [], [], [], []
        for r in range(args.rounds):
            ours.append(minicoder_tokens_per_s(model_cfg, train_cfg, work / "data", args.steps, args.warmup))
            if args.compile:
                compiled_cfg = dataclasses.replace(train_cfg, compile=True)
                ours_compiled.append(minicoder_tokens_per_s(model_cfg, compiled_cfg, work / "data", args.steps, args.warmup))
            theirs.append(transformers_tokens_per_s(model_cfg, train_cfg, vocab, args.steps, args.warmup, amp))
            theirs_fused.append(transformers_tokens_per_s(model_cfg, train_cfg, vocab, args.steps, args.warmup, amp, True))
            print(f"round {r + 1}: minicoder {ours[-1]:,.0f} tok/s" +
                  (f", minicoder --compile true {ours_compiled[-1]:,.0f} tok/s" if ours_compiled else "") +
                  f", transformers {theirs[-1]:,.0f} tok/s, "
                  f"transformers + fused AdamW {theirs_fused[-1]:,.0f} tok/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours_tps, theirs_tps, fused_tps = max(ours), max(theirs), max(theirs_fused)
    dtype_name = "bf16" if amp else "fp32"
    ours_gflops, theirs_gflops, fused_gflops = (t * flops_per_token / 1e9 for t in (ours_tps, theirs_tps, fused_tps))
    rows = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, AVX-512 BF16 "
                   f"{'yes' if torch.cpu._is_avx512_bf16_supported() else 'no'}, torch {torch.__version__}",
        "config": f"{Path(args.config).name}: {model_cfg.num_parameters() / 1e6:.2f}M params, batch {train_cfg.batch_size}x{train_cfg.seq_len}, accum {train_cfg.grad_accum}, {dtype_name}",
        "peak": peak,
    }
    lines = [
        "## Training throughput (`benchmarks/train_throughput.py`)",
        "",
        f"Machine: {rows['machine']}; {time.strftime('%Y-%m-%d')}.  ",
        f"Model: {rows['config']}; {flops_per_token / 1e6:.1f} MFLOP per token (6N + attention).  ",
        f"Measured matmul peak (2048², this run): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s.",
        "",
        "| loop | tokens/s | GFLOP/s | % of fp32 peak | % of bf16 peak |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| minicoder pretrain | {ours_tps:,.0f} | {ours_gflops:.1f} | {100 * ours_gflops / peak['fp32']:.0f}% | {100 * ours_gflops / peak['bf16']:.0f}% |",
        *([f"| minicoder pretrain --compile true | {max(ours_compiled):,.0f} | {max(ours_compiled) * flops_per_token / 1e9:.1f} | "
           f"{100 * max(ours_compiled) * flops_per_token / 1e9 / peak['fp32']:.0f}% | {100 * max(ours_compiled) * flops_per_token / 1e9 / peak['bf16']:.0f}% |"]
          if ours_compiled else []),
        f"| transformers LlamaForCausalLM, plain loop | {theirs_tps:,.0f} | {theirs_gflops:.1f} | {100 * theirs_gflops / peak['fp32']:.0f}% | {100 * theirs_gflops / peak['bf16']:.0f}% |",
        f"| transformers LlamaForCausalLM, plain loop + fused AdamW | {fused_tps:,.0f} | {fused_gflops:.1f} | {100 * fused_gflops / peak['fp32']:.0f}% | {100 * fused_gflops / peak['bf16']:.0f}% |",
        "",
        f"**Ratio minicoder / transformers: {ours_tps / theirs_tps:.2f}x** (best of {args.rounds} alternating rounds, median step of {args.steps}); "
        f"{ours_tps / fused_tps:.2f}x against the same loop with fused AdamW" +
        (f"; with `--compile true` {max(ours_compiled) / theirs_tps:.2f}x." if ours_compiled else "."),
        "",
        f"Reading: the transformers loop already runs at {100 * theirs_gflops / peak['fp32']:.0f}% of this CPU's fp32 matmul peak, "
        f"so no loop can beat it by more than {peak['fp32'] / theirs_gflops:.2f}x here; the issue's 1.2x aim is met only where the "
        "ratio above says so. Where minicoder gains: the fused AdamW kernel (one pass over memory instead of a Python loop "
        "over tensors) and, with `--compile true`, inductor fusing the elementwise work (RMSNorm, RoPE, SwiGLU, residuals) "
        "that makes up most of the non-matmul time. On a CPU without AVX-512 BF16 (`AVX-512 BF16 no` above) bf16 matmuls are "
        f"emulated at {peak['bf16']:.0f} GFLOP/s, so `--dtype auto` trains in fp32 and the bf16-peak column exceeds 100%.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    existing = out.read_text() if out.exists() else "# Benchmarks\n\nEvery figure here was measured by the script named in its section.\n\n"
    start = existing.find("## Training throughput")
    if start >= 0:
        end = existing.find("\n## ", start + 1)
        existing = existing[:start] + existing[end + 1 if end >= 0 else len(existing):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(existing.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
