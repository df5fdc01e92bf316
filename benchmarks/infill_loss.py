"""Teacher-forced infilling loss: bits per character of the true middle line of HumanEval single-line
infilling tasks, given the FIM prompt (PSM), for one or more model directories.

Exact match moves in steps and stays at 0 for small or short-trained models; this loss shows whether a
model has learnt to use the FIM layout at all, so it separates two arms of a FIM A/B at small budgets.

  .venv/bin/python benchmarks/infill_loss.py MODEL_DIR [MODEL_DIR ...] [--limit 40]
"""

from __future__ import annotations

import argparse
import math

import torch

from minicoder.eval.infill import infill_tasks
from minicoder.model import LlamaForCausalLM
from minicoder.tokenizer import Tokenizer


@torch.inference_mode()
def middle_bits_per_char(model_dir: str, limit: int | None) -> dict:
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tok = Tokenizer(model_dir)
    context = model.config.max_position_embeddings
    nats = chars = 0.0
    tasks = infill_tasks(limit)
    for task in tasks:
        middle = tok.encode(task["middle"]) + [tok.eos_id]
        prefix, suffix = tok.encode(task["prefix"]), tok.encode(task["suffix"])
        room = context - len(middle) - 4
        suffix = suffix[: max(room // 4, room - len(prefix))]
        prefix = prefix[len(prefix) - (room - len(suffix)):]
        prompt = [tok.bos_id, tok.fim_begin_id, *prefix, tok.fim_hole_id, *suffix, tok.fim_end_id]
        ids = torch.tensor([prompt + middle])
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0, len(prompt) - 1 :]
        nats -= logp.gather(-1, torch.tensor(middle)[:, None]).sum().item()
        chars += len(task["middle"]) + 1
    return {"tasks": len(tasks), "middle_bits_per_char": nats / math.log(2) / chars}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--limit", type=int, default=40, help="HumanEval problems whose lines are used (default 40)")
    args = p.parse_args()
    for m in args.models:
        r = middle_bits_per_char(m, args.limit)
        print(f"{m}: {r['tasks']} lines, true-middle loss {r['middle_bits_per_char']:.4f} bits/char")


if __name__ == "__main__":
    main()
