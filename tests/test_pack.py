"""Packing: FIM rearrangement at character level, repository-disjoint splits, self-describing output."""

from __future__ import annotations

import json
import random

import numpy as np

from minicoder.data.fim import encode_document, split_document
from minicoder.data.pack import choose_validation_repos
from minicoder.tokenizer import Tokenizer

from conftest import run_cli


def test_fim_psm_and_spm_layout(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    text = "def add(a, b):\n    return a + b\n"
    rng = random.Random(3)
    psm = encode_document(text, tok, random.Random(3), rate=1.0, mode="psm")
    p, m, s = split_document(text, _after_coin(3))
    assert psm == [tok.bos_id, tok.fim_begin_id, *tok.encode(p), tok.fim_hole_id, *tok.encode(s), tok.fim_end_id,
                   *tok.encode(m), tok.eos_id]
    spm = encode_document(text, tok, random.Random(3), rate=1.0, mode="spm")
    assert spm == [tok.bos_id, tok.fim_begin_id, tok.fim_hole_id, *tok.encode(s), tok.fim_end_id, *tok.encode(p),
                   *tok.encode(m), tok.eos_id]
    assert tok.decode(psm) != text and sorted(tok.decode(psm)) == sorted(text)  # same characters, rearranged
    plain = encode_document(text, tok, rng, rate=0.0)
    assert plain == [tok.bos_id, *tok.encode(text), tok.eos_id]


def _after_coin(seed):
    rng = random.Random(seed)
    rng.random()  # the FIM coin flip comes first
    return rng


def test_fim_rate_is_respected(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    rng = random.Random(0)
    hits = sum(tok.fim_begin_id in encode_document("x = 1\n" * 5, tok, rng, rate=0.5) for _ in range(400))
    assert 160 < hits < 240


def test_validation_split_holds_whole_repositories(tiny_packed, tiny_corpus):
    meta = json.loads((tiny_packed / "meta.json").read_text())
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["repositories"] + va["repositories"] == 60 and va["repositories"] >= 1
    assert tr["documents"] == tr["repositories"]  # one document per repository in this corpus
    assert meta["fim"]["documents"] > 0 and meta["dtype"] == "uint16"
    val = np.fromfile(tiny_packed / va["shards"][0], dtype=np.uint16)
    tok = Tokenizer(tiny_packed / "tokenizer")
    assert val.size == va["tokens"] and tok.fim_begin_id not in val  # validation is never FIM-transformed
    assert (val == tok.bos_id).sum() == va["documents"] == (val == tok.eos_id).sum()
    repos = {json.loads(line)["repo"] for line in (tiny_corpus / "docs" / "shard-00000.jsonl").read_text().splitlines()}
    held_out = choose_validation_repos(repos, 0.1, 0)
    text = tok.decode(val.tolist())
    assert all(f"# {r.split('/')[1]}.py" in text for r in held_out)


def test_pack_is_deterministic(tiny_corpus, tiny_tokenizer, tmp_path):
    for name in ("a", "b"):
        run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out",
                str(tmp_path / name), "--val-fraction", "0.1", check=True)
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() == (tmp_path / "b" / "train-00000.bin").read_bytes()


def test_pack_bad_inputs_leave_nothing_behind(tiny_corpus, tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("data", "pack", "--corpus", str(tmp_path / "missing"), "--tokenizer", str(tiny_tokenizer), "--out", str(out))
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tmp_path), "--out", str(out))
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad_corpus"
    (bad / "docs").mkdir(parents=True)
    (bad / "docs" / "shard-00000.jsonl").write_text('{"repo": "a", "text": "x = 1"}\n{not json\n')
    proc = run_cli("data", "pack", "--corpus", str(bad), "--tokenizer", str(tiny_tokenizer), "--out", str(out))
    assert proc.returncode == 2 and "shard-00000.jsonl:2" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
