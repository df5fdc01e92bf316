"""Single-line infilling built from HumanEval (after InCoder / SantaCoder's HumanEval-SingleLineInfilling).

Each non-blank line of each canonical solution is masked in turn: the model sees the prompt and the solution
before the line as prefix, the rest of the solution as suffix, and writes the line. Scored by exact match
(whitespace-stripped) and pass@1 (the solution with the generated line runs the problem's tests in the sandbox).
"""

from __future__ import annotations

from .humaneval import check_program, execute, load_problems


def infill_tasks(limit: int | None = None) -> list[dict]:
    problems = load_problems()
    tasks = []
    for task_id in list(problems)[:limit] if limit else list(problems):
        problem = problems[task_id]
        lines = problem["canonical_solution"].splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            tasks.append({
                "task_id": f"{task_id}/L{i}",
                "problem": task_id,
                "prefix": problem["prompt"] + "".join(lines[:i]),
                "middle": line.rstrip("\n"),
                "suffix": "\n" + "".join(lines[i + 1 :]) if line.endswith("\n") else "".join(lines[i + 1 :]),
                "before": "".join(lines[:i]),
                "after": "".join(lines[i + 1 :]),
            })
    return tasks


def run_infill(completer, limit: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    problems = load_problems()
    tasks = infill_tasks(limit)
    outs = completer.complete([t["prefix"] for t in tasks], n=1, temperature=0.0, max_tokens=64, stop=["\n"],
                              suffixes=[t["suffix"] for t in tasks], progress=progress)
    rows, programs = [], []
    for task, (generated,) in zip(tasks, outs):
        line = generated.split("\n")[0]
        completion = task["before"] + line + "\n" + task["after"]
        programs.append(check_program(problems[task["problem"]], completion))
        rows.append({"task_id": task["task_id"], "middle": task["middle"], "generated": line,
                     "exact_match": line.strip() == task["middle"].strip()})
    for row, verdict in zip(rows, execute(programs)):
        row.update(result=verdict, passed=verdict == "passed")
    n = len(rows)
    summary = {"tasks": n, "exact_match": sum(r["exact_match"] for r in rows) / n, "pass@1": sum(r["passed"] for r in rows) / n}
    return summary, rows
