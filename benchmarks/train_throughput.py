"""Training throughput: `minicoder pretrain` against a plain PyTorch loop over transformers' LlamaForCausalLM.

Both train the same Llama config on the same batches with the same optimizer settings and dtype, in this one
process, alternating so that background load hits both alike. Also measures this CPU's fp32 and bf16 matmul
rates (benchmarks/common.py's probe), so each loop's GFLOP/s can be read against the machine's.

  .venv/bin/python benchmarks/train_throughput.py [--config configs/nano.toml] [--steps 15] [--dtype auto]
  .venv/bin/python benchmarks/train_throughput.py --steps 2 --warmup 1 --rounds 1     # a smoke test

Prints numbers and ratios only; raw results: OUT/train-*.json; `--render` fills docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import ROOT, Run, add_common_args, matmul_gflops

from minicoder.config import load_config
from minicoder.train.loop import autocast_dtype, train


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--config", default=str(ROOT / "configs" / "nano.toml"))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the loops this many times")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="also measure minicoder with torch.compile")
    args = ap.parse_args()

    run = Run("train", args)
    model_cfg, train_cfg = load_config(args.config, ["--dtype", args.dtype])
    amp = autocast_dtype(train_cfg.dtype, torch.device("cpu"))
    peak = {"fp32": matmul_gflops(dtype=torch.float32, seconds=2.0), "bf16": matmul_gflops(dtype=torch.bfloat16, seconds=2.0)}
    print(f"matmul 2048^3: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
    loops = {"minicoder pretrain": [], "transformers LlamaForCausalLM, plain loop": [],
             "transformers LlamaForCausalLM, plain loop + fused AdamW": []}
    if args.compile:
        loops["minicoder pretrain --compile true"] = []
    work = Path(tempfile.mkdtemp())
    try:
        vocab = fake_packed_data(work / "data", args.vocab_size, 2_000_000)
        model_cfg.vocab_size = vocab
        flops_per_token = model_cfg.flops_per_token(train_cfg.seq_len)
        for r in range(args.rounds):
            data = work / "data"
            loops["minicoder pretrain"].append(minicoder_tokens_per_s(model_cfg, train_cfg, data, args.steps, args.warmup))
            if args.compile:
                compiled_cfg = dataclasses.replace(train_cfg, compile=True)
                loops["minicoder pretrain --compile true"].append(
                    minicoder_tokens_per_s(model_cfg, compiled_cfg, data, args.steps, args.warmup))
            loops["transformers LlamaForCausalLM, plain loop"].append(
                transformers_tokens_per_s(model_cfg, train_cfg, vocab, args.steps, args.warmup, amp))
            loops["transformers LlamaForCausalLM, plain loop + fused AdamW"].append(
                transformers_tokens_per_s(model_cfg, train_cfg, vocab, args.steps, args.warmup, amp, True))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in loops.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dtype_name = "bf16" if amp else "fp32"
    best = {k: max(v) for k, v in loops.items()}
    rows = [{"loop": k, "tokens_per_s": v, "gflops": v * flops_per_token / 1e9,
             "pct_of_fp32_peak": 100 * v * flops_per_token / 1e9 / peak["fp32"],
             "pct_of_bf16_peak": 100 * v * flops_per_token / 1e9 / peak["bf16"], "rounds": loops[k]}
            for k, v in best.items()]
    theirs, fused = best["transformers LlamaForCausalLM, plain loop"], best["transformers LlamaForCausalLM, plain loop + fused AdamW"]
    ratios = {"minicoder / transformers": best["minicoder pretrain"] / theirs,
              "minicoder / transformers + fused AdamW": best["minicoder pretrain"] / fused}
    if args.compile:
        ratios["minicoder --compile true / transformers"] = best["minicoder pretrain --compile true"] / theirs
    for row in rows:
        print(f"{row['loop']}: {row['tokens_per_s']:,.0f} tok/s, {row['gflops']:.1f} GFLOP/s, "
              f"{row['pct_of_fp32_peak']:.0f}% of the fp32 matmul rate, {row['pct_of_bf16_peak']:.0f}% of the bf16 rate")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    run.save({"config": Path(args.config).name, "params": model_cfg.num_parameters(), "batch_size": train_cfg.batch_size,
              "seq_len": train_cfg.seq_len, "grad_accum": train_cfg.grad_accum, "dtype": dtype_name,
              "flops_per_token": flops_per_token, "steps": args.steps, "rounds": args.rounds,
              "matmul_peak_gflops": peak, "loops": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
