"""SFT: mined instruction pairs (deterministic, deduplicated, decontaminated), user JSONL validation,
assistant-only loss masks, and the `minicoder sft` run on top of a pretrained checkpoint."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from minicoder.data.sft import build_sft_data
from minicoder.eval.humaneval import load_problems
from minicoder.tokenizer import Tokenizer
from minicoder.train.loop import IGNORE_INDEX
from minicoder.train.sft import ChatSamples

from conftest import run_cli

MODULE = '''def area(width, height):
    """Return the area of a width x height rectangle."""
    result = width * height
    return result


class Stack:
    def push(self, item):
        """Put item on top of the stack, growing it by one."""
        self.items.append(item)
        return len(self.items)


def undocumented(x):
    return x + 1
'''


def write_corpus(root, docs):
    (root / "docs").mkdir(parents=True)
    with open(root / "docs" / "shard-00000.jsonl", "w") as f:
        for repo, files in docs.items():
            text = "\n".join(f"# {path}\n{src}" for path, src in files.items())
            f.write(json.dumps({"repo": repo, "lang": "python", "paths": list(files), "text": text}) + "\n")
    return root


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mining_pairs_dedup_and_decontamination(tmp_path):
    he = load_problems()["HumanEval/2"]
    contaminated = he["prompt"] + he["canonical_solution"]
    corpus = write_corpus(tmp_path / "corpus", {
        "repo/a": {"a/geometry.py": MODULE},
        "repo/b": {"b/copy.py": MODULE},  # the same functions again: duplicates
        "repo/c": {"c/he.py": contaminated},
    })
    meta = build_sft_data(tmp_path / "sft", corpus, val_fraction=0.0, progress=False)
    data = rows(tmp_path / "sft" / "train.jsonl")
    implement = [r for r in data if r["kind"] == "implement"]
    assert sorted(r["messages"][0]["content"].split("`")[1] for r in implement) == ["def area(width, height)", "def push(self, item)"]
    assert implement[0]["messages"][1]["content"].startswith("```python\ndef ")
    assert meta["counts"]["duplicates"] >= 2 and len(implement) == 2 and meta["counts"]["decontaminated"] >= 1
    assert not any("truncate_number" in json.dumps(r) for r in data)
    again = build_sft_data(tmp_path / "sft2", corpus, val_fraction=0.0, progress=False)
    assert (tmp_path / "sft2" / "train.jsonl").read_text() == (tmp_path / "sft" / "train.jsonl").read_text()
    assert again["kinds"] == meta["kinds"]


def test_user_jsonl_errors_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good), "{broken", json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), json.dumps(good | {"id": 2})]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli("data", "sft", "--messages", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "mine.jsonl:2: invalid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("data", "sft", "--messages", str(path), "--out", str(tmp_path / "out"), "--skip-bad", "--val-fraction", "0")
    assert proc.returncode == 0 and "skipped 3 bad lines" in proc.stdout
    assert len(rows(tmp_path / "out" / "train.jsonl")) == 1  # the two good rows are duplicates


def test_loss_mask_covers_assistant_turns_only(tiny_tokenizer, tmp_path):
    tok = Tokenizer(tiny_tokenizer)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sum 1 and 2."},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 and 2?"},
                {"role": "assistant", "content": "def f():\n    return 4"}]
    ids, mask = tok.chat_ids(messages)
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert tok.decode(ids, skip_special_tokens=False) == hf.apply_chat_template(messages, tokenize=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "3\n<|EOT|>def f():\n    return 4\n<|EOT|>"
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": messages[:3]}) + "\n")
    x, y = ChatSamples(path, tok, seq_len=256).get([0, 1])
    assert x.shape[0] == 2 and (x[1, -1] == tok.pad_id)
    first = [t for t in y[0].tolist() if t != IGNORE_INDEX]
    assert tok.decode(first, skip_special_tokens=False) == trained
    assert (y[1] != IGNORE_INDEX).sum() == len(tok.encode("3\n")) + 1


def test_sft_run_on_pretrained_checkpoint(tiny_trained, tiny_corpus, tiny_preset, tmp_path):
    run_cli("data", "sft", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "sft_data"), "--max-pairs", "200", check=True)
    short = {"messages": [{"role": "system", "content": "Code."}, {"role": "user", "content": "x?"},
                          {"role": "assistant", "content": "x = 1"}]}
    (tmp_path / "sft_data" / "val.jsonl").write_text(json.dumps(short) + "\n")  # fits the tiny model's context
    out = tmp_path / "sft"
    proc = run_cli("sft", "--config", str(tiny_preset), "--init", str(tiny_trained / "final"), "--data",
                   str(tmp_path / "sft_data"), "--out", str(out), "--max-steps", "4", "--seq-len", "127", "--quiet", check=True)
    assert "final model" in proc.stdout
    info = json.loads((out / "final" / "minicoder.json").read_text())
    pretrain_tokens = json.loads((tiny_trained / "final" / "minicoder.json").read_text())["tokens_trained"]
    assert info["stage"] == "sft" and info["tokens_trained"] > pretrain_tokens
    log = rows(out / "log.jsonl")
    assert len(log) == 4 and "val_loss" in log[-1]
    proc = run_cli("generate", str(out / "final"), "--chat", "--prompt", "Write a function that adds two numbers.",
                   "--max-new-tokens", "8", check=True)
    assert proc.returncode == 0
