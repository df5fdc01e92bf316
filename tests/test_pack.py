"""Packing: per-chunk FIM inside one training window, round trip to the original text, repository-disjoint
splits, self-describing output."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from minicoder.data.chunking import chunk_spans, file_spans
from minicoder.data.fim import FimSettings, assemble, fim_decision, split_lines
from minicoder.data.pack import choose_validation_repos, read_documents, train_segments
from minicoder.tokenizer import Tokenizer

from conftest import run_cli


def test_fim_psm_and_spm_layout(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    p, m, s = (tok.encode(t) for t in ("def add(a, b):\n    return ", "a + b", "\n"))
    assert assemble([p, m, s], tok, "psm") == [tok.bos_id, tok.fim_begin_id, *p, tok.fim_hole_id, *s, tok.fim_end_id,
                                               *m, tok.eos_id]
    assert assemble([p, m, s], tok, "spm") == [tok.bos_id, tok.fim_begin_id, tok.fim_hole_id, *s, tok.fim_end_id,
                                               *p, *m, tok.eos_id]
    assert assemble([p], tok, "plain") == [tok.bos_id, *p, tok.eos_id]


def test_fim_rates_are_respected():
    rng = random.Random(0)
    text = "def f(x):\n    y = x + 1\n    return y\n"
    modes = Counter()
    lines = 0
    for _ in range(2000):
        pieces, mode = fim_decision(text, rng, FimSettings(rate=0.5, spm_rate=0.5, line_rate=0.5))
        modes[mode] += 1
        assert "".join(pieces) == text
        prefix, middle, suffix = pieces if mode != "plain" else ("x", "", "")
        lines += (prefix in ("", "\n") or prefix.endswith("\n")) and suffix.startswith("\n") \
            and middle.strip() != "" and middle[0] != "\n" and middle[-1] != "\n"
    assert 900 < modes["plain"] < 1100 and 400 < modes["psm"] < 600 and 400 < modes["spm"] < 600
    assert lines > 460  # line-level middles: about half of the FIM chunks (plus random spans that happen to be lines)


def test_line_middle_is_laid_out_like_single_line_infilling():
    text = "def f(x):\n    y = x + 1\n\n    return y\n"
    for seed in range(50):
        prefix, middle, suffix = split_lines(text, random.Random(seed))
        assert prefix + middle + suffix == text
        assert prefix == "" or prefix.endswith("\n")
        assert middle.strip() and not middle.startswith("\n") and not middle.endswith("\n")
        assert suffix.startswith("\n")


def test_chunks_tile_the_file_within_budget(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    text = "import os\n\n" + "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(40))
    starts = [a for a, _ in tok.tok.encode(text, add_special_tokens=False).offsets]
    spans = chunk_spans(text, starts, 40)
    assert len(spans) > 5 and "".join(text[a:b] for a, b in spans) == text
    for a, b in spans:
        assert len(tok.encode(text[a:b])) <= 40 + 2  # boundary tokens may merge differently by a token or two
        assert text[a:b].startswith(("import", "def", "\n"))  # cut at top-level statements, not inside functions
    doc = "# a.py\nx = 1\n\n# b.py\ny = 2\n"
    assert [doc[a:b] for a, b in file_spans(doc, ["a.py", "b.py"])] == ["# a.py\nx = 1\n\n", "# b.py\ny = 2\n"]


def decode_fim(body: list[int], tok: Tokenizer) -> tuple[str, str]:
    """(order, prefix + middle + suffix) of a FIM chunk's tokens between BOS and EOS."""
    hole, mid = body.index(tok.fim_hole_id), body.index(tok.fim_end_id)
    if hole == 1:  # SPM: <fim_begin><fim_hole> suffix <fim_end> prefix middle
        return "spm", tok.decode(body[mid + 1 :]) + tok.decode(body[2:mid])
    # PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle
    return "psm", tok.decode(body[1:hole]) + tok.decode(body[mid + 1 :]) + tok.decode(body[hole + 1 : mid])


def parse_train_stream(ids: np.ndarray, tok: Tokenizer):
    """FIM chunks as (order, text, first, end) positions, and the texts of the plain runs, from a packed stream."""
    ids = ids.tolist()
    fim, plain, i = [], [], 0
    while i < len(ids):
        if ids[i] == tok.bos_id and i + 1 < len(ids) and ids[i + 1] == tok.fim_begin_id:
            end = ids.index(tok.eos_id, i)
            fim.append((*decode_fim(ids[i + 1 : end], tok), i, end + 1))
            i = end + 1
        else:
            plain.append(ids[i])
            i += 1
    runs, i = [], 0
    while i < len(plain):  # what is left is plain runs, BOS ... EOS, back to back
        assert plain[i] == tok.bos_id
        end = plain.index(tok.eos_id, i)
        runs.append(tok.decode(plain[i + 1 : end]))
        i = end + 1
    return fim, runs


@pytest.mark.parametrize("window", [64, 128])
def test_packed_fim_chunks_lie_inside_one_window_and_round_trip(tiny_corpus, tiny_tokenizer, tmp_path, window):
    out = tmp_path / "data"
    run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out", str(out),
            "--val-fraction", "0.1", "--seq-len", str(window), check=True)
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer(out / "tokenizer")
    ids = np.concatenate([np.fromfile(out / s, dtype=np.uint16) for s in meta["splits"]["train"]["shards"]])
    fim, runs = parse_train_stream(ids, tok)
    assert meta["fim"]["placed"] == len(fim) > 100 and {"psm", "spm"} <= {order for order, *_ in fim}
    assert meta["fim"]["demoted_to_plain"] < len(fim) / 10
    for _, _, start, end in fim:  # the trainer's window k holds tokens [k*window, (k+1)*window]
        assert start // window == (end - 1) // window, f"a FIM chunk crosses a {window}-token window boundary"

    # Round trip: the packed stream holds exactly the chunks of the training documents, which tile them.
    val_repos = choose_validation_repos({d["repo"] for d in read_documents(tiny_corpus)}, 0.1, 0)

    def token_starts(text):
        return [a for a, _ in tok.tok.encode(text, add_special_tokens=False).offsets]

    expected = Counter()
    for doc in read_documents(tiny_corpus):
        if doc["repo"] in val_repos:
            continue
        rng = random.Random(f"0:{doc['repo']}:{len(doc['text'])}")
        segs = train_segments(doc["text"], doc["paths"], token_starts, rng, FimSettings(), window * 3 // 4)
        assert "".join(text for _, _, text in segs) == doc["text"]
        expected.update(text for _, _, text in segs)
    assert Counter([text for _, text, _, _ in fim] + runs) == expected


def test_pack_rejects_bad_fim_settings(tiny_corpus, tiny_tokenizer, tmp_path):
    proc = run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out",
                   str(tmp_path / "o"), "--fim-spm-rate", "1.5")
    assert proc.returncode == 2 and "--fim-spm-rate" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("data", "pack", "--corpus", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out",
                   str(tmp_path / "o"), "--seq-len", "64", "--fim-chunk-tokens", "100")
    assert proc.returncode == 2 and "--fim-chunk-tokens" in proc.stderr and not (tmp_path / "o").exists()


def test_validation_split_holds_whole_repositories(tiny_packed, tiny_corpus):
    meta = json.loads((tiny_packed / "meta.json").read_text())
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["repositories"] + va["repositories"] == 60 and va["repositories"] >= 1
    assert tr["documents"] == tr["repositories"]  # one document per repository in this corpus
    assert meta["fim"]["placed"] > 0 and meta["dtype"] == "uint16"
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
