"""Task-shaped data: generated exercises pass their own tests in the sandbox, never collide with HumanEval,
and `minicoder data tasks` writes them with mined functions and replay into a packable corpus."""

from __future__ import annotations

import json

from minicoder.data.decontam import Decontaminator, humaneval_references
from minicoder.data.exercises import FAMILIES, Exercise, generate, verify
from minicoder.data.tasks import humaneval_entry_points

from conftest import run_cli


def test_exercise_solutions_pass_their_tests_in_the_sandbox():
    exercises = generate(len(FAMILIES) * 3, seed=7)
    assert {ex.family for ex in exercises} == {f.__name__ for f in FAMILIES}
    broken = Exercise("add_one", ["x"], "Return x plus one.", "    return x + 2\n", [((1,), 2)])
    looping = Exercise("spin", ["x"], "Never returns.", "    while True:\n        pass\n", [((1,), 1)])
    verdicts = verify([*exercises, broken], progress=False)
    assert verdicts == [True] * len(exercises) + [False]  # a wrong reference solution is caught
    assert verify([looping, exercises[0]], progress=False) == [False, False]  # a hung batch counts as failed


def test_exercises_never_collide_with_humaneval():
    names = humaneval_entry_points()
    decontam = Decontaminator(humaneval_references())
    exercises = generate(2000, seed=0)
    assert not any(ex.name in names for ex in exercises)
    assert not any(decontam.contaminated(ex.code() + ex.tests()) for ex in exercises)
    # the check itself works: a HumanEval solution's text is caught
    assert decontam.contaminated(next(iter(humaneval_references().values())))


def test_data_tasks_writes_a_packable_corpus(tiny_corpus, tiny_tokenizer, tmp_path):
    out = tmp_path / "tasks"
    proc = run_cli("data", "tasks", "--corpus", str(tiny_corpus), "--out", str(out), "--exercises", "60",
                   "--replay", "0.5", "--val-fraction", "0.1", check=True)
    assert "60 verified exercises" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"]["exercises"] == 8 and meta["documents"]["mined"] > 0 and meta["documents"]["replay"] > 0
    rows = [json.loads(line) for line in (out / "docs" / "shard-00000.jsonl").read_text().splitlines()]
    from minicoder.data.pack import choose_validation_repos

    held_out = choose_validation_repos({json.loads(l)["repo"] for l in (tiny_corpus / "docs" / "shard-00000.jsonl").open()}, 0.1, 0)
    assert not any(r["repo"] in held_out or r["repo"].split("/", 1)[-1].rsplit("/", 1)[0] in held_out for r in rows)
    assert all('"""' in r["text"] for r in rows if r["kind"] == "exercises")
    run_cli("data", "pack", "--corpus", str(out), "--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "p"), check=True)
    proc = run_cli("data", "tasks", "--out", str(tmp_path / "none"), "--exercises", "0")
    assert proc.returncode == 2 and "--exercises" in proc.stderr


def test_sft_data_takes_exercises_in_chat_form(tmp_path):
    run_cli("data", "sft", "--exercises", "30", "--out", str(tmp_path / "sft"), "--val-fraction", "0", check=True)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {r["kind"] for r in rows} == {"exercise"}
    user, assistant = rows[0]["messages"]
    assert user["content"].startswith("Write a Python function `") and assistant["content"].startswith("```python\ndef ")


def test_educational_value_filter_and_repository_cap(tmp_path):
    import ast

    from minicoder.data.filters import educational_value

    lesson = 'def area(r):\n    """Area of a circle of radius r."""\n    return 3.14159 * r * r\n'
    table = "TABLE = [\n" + "".join(f"    {i}, {i + 1}, {i + 2},\n" for i in range(0, 300, 3)) + "]\n"
    assert educational_value(ast.parse(lesson), lesson) > 0.9 > 0.1 > educational_value(ast.parse(table), table)
    src = tmp_path / "src"
    for repo, files in {"lessons": {f"m{i}.py": lesson.replace("area", f"area{i}") * (i + 1) for i in range(6)},
                        "tables": {"t.py": table}}.items():
        (src / repo).mkdir(parents=True)
        for name, text in files.items():
            (src / repo / name).write_text(text)
    run_cli("data", "corpus", str(src), "--out", str(tmp_path / "c"), "--min-edu-score", "0.3", "--max-repo-bytes", "300",
            "--no-progress", check=True)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["counts"]["dropped"]["low_educational_value"] == 1 and meta["counts"]["dropped"]["repository_cap"] >= 3
    assert meta["settings"]["min_edu_score"] == 0.3
