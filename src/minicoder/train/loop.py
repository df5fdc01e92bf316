"""The training loop, one for pretraining and SFT.

AdamW (or Muon + AdamW, optim.py) with warmup + cosine or warmup-stable-decay (schedule.py), gradient clipping and accumulation, bf16 autocast where the
hardware runs it fast, DDP under `torchrun` (gloo on CPU, nccl on GPU). Every step goes to
OUT/log.jsonl; every `log_interval` steps a line in the seed's style; every `eval_interval` steps the
validation loss and bits per byte; every `save_interval` steps an atomic checkpoint. `--resume` continues
from the newest checkpoint that loads completely (a torn last log line from a killed run is dropped) and
reproduces the losses of an uninterrupted run exactly: data order is a function of (seed, step) and the
optimizer and RNG states are restored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..hardware import cpu_has_fast_bf16
from ..config import TrainConfig
from ..data.io import atomic_write_text
from ..errors import MinicoderError
from ..model import LlamaForCausalLM, ModelConfig
from .checkpoint import (clean_run_dir, list_checkpoints, newest_loadable_checkpoint, read_training_info,
                         save_checkpoint, save_model_dir, set_aside, set_rng_state)
from .data import Datasets, EpochSampler, packed_datasets
from .optim import build_optimizer, load_optimizer_state
from .schedule import SCHEDULES, lr_at

IGNORE_INDEX = -100


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. `auto` takes bf16 only where it is fast: a CUDA GPU with bf16, or a CPU
    with AVX-512 BF16 / AMX (elsewhere CPU bf16 matmuls are emulated and slower than fp32)."""
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise MinicoderError(f"dtype must be auto, fp32 or bf16, got {choice!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


class Distributed:
    """Process-group setup when launched by torchrun; a no-op single process otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, val, cfg: TrainConfig, amp, device) -> float:
    """Mean loss over a fixed, evenly spread set of validation windows."""
    model.eval()
    n = min(len(val), cfg.eval_batches * cfg.batch_size)
    chosen = torch.linspace(0, len(val) - 1, n).long().numpy()
    total = 0.0
    for i in range(0, n, cfg.batch_size):
        x, y = val.get(chosen[i : i + cfg.batch_size])
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total += loss_fn(model(x.to(device)), y.to(device)).item() * len(x)
    model.train()
    return total / n


def format_log_line(step, max_steps, epoch, epochs, loss, lr, elapsed, tokens_per_s, flops_per_s) -> str:
    remaining_min = elapsed / max(step, 1) * (max_steps - step) / 60
    return (f"Epoch:[{epoch}/{epochs}]({step}/{max_steps}) loss:{loss:.3f} lr:{lr:.12f} "
            f"epoch_time:{remaining_min:.1f}min tokens/s:{tokens_per_s:,.0f} GFLOP/s:{flops_per_s / 1e9:.1f}")


def plot_losses(log_file: Path, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=0.8)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def truncate_log(log_file: Path, last_step: int):
    """On resume, keep only records up to the checkpoint: the resumed run rewrites the rest.

    The last line may be torn (the run was killed while appending it): it is dropped with a warning.
    A bad line anywhere else is not something a kill makes, so it is an error naming the line.
    """
    if not log_file.exists():
        return
    lines = [(n, line) for n, line in enumerate(log_file.read_text(errors="replace").splitlines(), 1) if line.strip()]
    keep = []
    for n, line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            if n == lines[-1][0]:
                print(f"warning: {log_file}:{n}: dropping a torn last line (the run was killed while writing it)",
                      file=sys.stderr)
                continue
            raise MinicoderError(f"{log_file}:{n}: not a training log record; remove the line to resume") from None
        if step <= last_step:
            keep.append(line)
    atomic_write_text(log_file, "".join(line + "\n" for line in keep))


def train(model_cfg: ModelConfig, cfg: TrainConfig, data: Datasets | str | Path, out_dir: str | Path, *,
          resume: bool = False, stop_after: int | None = None, progress: bool = True, run_info: dict | None = None) -> dict:
    """Train and return a summary. `data` is a packed data directory (pretraining) or prepared `Datasets`
    (SFT passes its masked chat samples)."""
    if not isinstance(data, Datasets):
        data = packed_datasets(data, cfg.seq_len)
    ddp = Distributed()
    try:
        return _train(model_cfg, cfg, data, Path(out_dir), ddp, resume, stop_after, progress, run_info or {})
    finally:
        ddp.close()


def _train(model_cfg, cfg, data: Datasets, out_dir, ddp, resume, stop_after, progress, run_info):
    train_data, val_data, tokenizer_dir = data.train, data.val, data.tokenizer_dir
    model_cfg.vocab_size = data.vocab_size
    if cfg.schedule not in SCHEDULES:
        raise MinicoderError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 <= cfg.decay_fraction <= 1:
        raise MinicoderError(f"decay_fraction must be in [0, 1], got {cfg.decay_fraction}")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise MinicoderError(f"seq_len {cfg.seq_len} > max_position_embeddings {model_cfg.max_position_embeddings}")

    if ddp.main:
        clean_run_dir(out_dir)
    ddp.barrier()
    checkpoints = list_checkpoints(out_dir)
    if checkpoints and not resume:
        raise MinicoderError(f"{out_dir}: already holds checkpoints; pass --resume to continue it or choose another --out")

    torch.manual_seed(cfg.seed)
    base_tokens = 0  # tokens the initial checkpoint was already trained on (SFT starts from a pretrained model)
    if cfg.init:
        model = LlamaForCausalLM.from_pretrained(cfg.init)
        base_tokens = read_training_info(cfg.init).get("tokens_trained", 0)
        model_cfg.__dict__.update(model.config.__dict__)
    else:
        model = LlamaForCausalLM(model_cfg)
    model.to(ddp.device).train()
    optimizer = build_optimizer(model, cfg)
    settings = {"model": asdict(model_cfg), "train": asdict(cfg), "data": data.source,
                "tokenizer_fingerprint": data.tokenizer_fingerprint}

    start_step, tokens_trained = 0, base_tokens
    unloadable, info = [], None  # info: what the newest model is (stage, steps, tokens), for final/
    if resume and checkpoints:
        point, unloadable = newest_loadable_checkpoint(out_dir)
        if point is None:
            raise MinicoderError(f"{out_dir}: no checkpoint loads completely: " + "; ".join(why for _, why in unloadable))
        model.load_state_dict(point.model.state_dict())
        load_optimizer_state(optimizer, point.state, cfg, point.path)
        set_rng_state(point.state["rng"])
        start_step = point.state["step"]
        info = point.info
        tokens_trained = info.get("tokens_trained", tokens_trained)
        if ddp.main:
            for _, why in unloadable:
                print(f"warning: skipping a newer checkpoint: {why}", file=sys.stderr)
            print(f"resuming from {point.path} (step {start_step})")
    elif resume and ddp.main:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'} yet; starting a fresh run", file=sys.stderr)
    ddp.barrier()  # every process has read its checkpoint before unloadable ones are moved
    if ddp.main:
        for path, _ in unloadable:
            set_aside(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(out_dir / "log.jsonl", start_step)
        atomic_write_text(out_dir / "settings.json", json.dumps(settings, indent=2) + "\n")

    amp = autocast_dtype(cfg.dtype, ddp.device)
    runner = model
    if cfg.compile:
        runner = torch.compile(model)
    if ddp.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None)

    sampler = EpochSampler(len(train_data), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum * ddp.world  # sequences per optimizer step, all processes
    epochs = max(1, math.ceil(cfg.max_steps * per_step / len(train_data)))
    flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
    end_step = min(cfg.max_steps, stop_after) if stop_after else cfg.max_steps
    log_file = out_dir / "log.jsonl"
    summary = {"start_step": start_step, "tokens": 0}

    if ddp.main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters; {len(train_data):,} training samples of up to {cfg.seq_len} tokens; "
              f"{per_step} samples per step; dtype {'bf16 autocast' if amp else 'fp32'}; {ddp.world} process(es)")
    bar = tqdm(total=end_step, initial=start_step, desc="train", unit="step", disable=not (progress and ddp.main), dynamic_ncols=True)
    run_start = time.time()
    last_loss = last_val = None
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            first = step * per_step + (micro * ddp.world + ddp.rank) * cfg.batch_size
            x, y = train_data.get(sampler.indices(first, cfg.batch_size))
            x, y = x.to(ddp.device), y.to(ddp.device)
            step_tokens += x.numel() * ddp.world
            sync = micro == cfg.grad_accum - 1 or ddp.world == 1
            with (contextlib.nullcontext() if sync else runner.no_sync()):
                with torch.autocast(ddp.device.type, dtype=amp, enabled=amp is not None):
                    loss = loss_fn(runner(x), y) / cfg.grad_accum
                loss.backward()
            step_loss += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = ddp.mean(step_loss)
        done = step + 1
        seconds = time.perf_counter() - t0
        tokens_per_s = step_tokens / seconds
        record = {"step": done, "loss": round(loss_value, 6), "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                  "flops_per_s": round(tokens_per_s * flops_per_token)}
        if val_data is not None and (done % cfg.eval_interval == 0 or done == end_step):
            val_loss = evaluate(model, val_data, cfg, amp, ddp.device)  # identical on every process
            record["val_loss"] = round(val_loss, 6)
            if data.val_bytes:
                record["val_bpb"] = round(val_loss / math.log(2) * data.val_tokens / data.val_bytes, 6)
            last_val = record
        summary["tokens"] += step_tokens
        last_loss = loss_value
        if ddp.main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if done % cfg.log_interval == 0 or done == end_step:
                epoch = sampler.epoch_of(done * per_step - 1) + 1
                bar.write(format_log_line(done, cfg.max_steps, epoch, epochs, loss_value, lr, time.time() - run_start,
                                          tokens_per_s, tokens_per_s * flops_per_token))
            if "val_loss" in record:
                bar.write(f"step {done}: val_loss {record['val_loss']:.4f}" +
                          (f" val_bpb {record['val_bpb']:.4f}" if "val_bpb" in record else ""))
        tokens_trained += step_tokens
        info = {**run_info, "steps": done, "tokens_trained": tokens_trained, "seq_len": cfg.seq_len,
                **({"val_loss": last_val["val_loss"], "val_bpb": last_val.get("val_bpb")} if last_val else {})}
        if done % cfg.save_interval == 0 or done == end_step:
            if ddp.main:
                save_checkpoint(model, optimizer, done, settings, tokenizer_dir, out_dir, cfg.keep_checkpoints, info)
            ddp.barrier()
    bar.close()

    summary.update(end_step=end_step, loss=last_loss, seconds=round(time.time() - run_start, 1))
    if last_val:
        summary.update(val_loss=last_val.get("val_loss"), val_bpb=last_val.get("val_bpb"))
    final = out_dir / "final"
    # Also when a resumed run had nothing left to train but was killed before its final/ was complete.
    if ddp.main and end_step == cfg.max_steps and info is not None and (
            end_step > start_step or read_training_info(final).get("steps") != end_step):
        save_model_dir(model, tokenizer_dir, final, info=info)
        summary["final"] = str(final)
    if ddp.main and log_file.exists():
        plot_losses(log_file, out_dir / "loss.png")
        summary["plot"] = str(out_dir / "loss.png")
    if ddp.main:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
