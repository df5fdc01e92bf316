"""The tokenizer round-trips any text, loads in transformers, and carries DeepSeek-Coder's special tokens."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from minicoder.tokenizer import BOS, EOS, EOT, FIM_BEGIN, FIM_END, FIM_HOLE, PAD, Tokenizer

SAMPLES = [
    "def héllo_世界():\n    return '🚀'  \t\n\n",
    "    \n\t\t  x = 1\r\n",
    "<｜fim▁begin｜> is just text here",
    "",
    "\x00\x01 control chars and \u200b zero width",
]


def test_round_trip_unicode(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    rng = random.Random(0)
    randoms = ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF), rng.randrange(0x1F300, 0x1F6FF)]))
                       for _ in range(200)) for _ in range(20)]
    for text in SAMPLES + randoms:
        assert tok.decode(tok.encode(text)) == text


def test_transformers_autotokenizer_loads_and_agrees(tiny_tokenizer):
    ours = Tokenizer(tiny_tokenizer)
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    text = SAMPLES[0]
    assert hf(text)["input_ids"] == ours.encode(text, bos=True)
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert [hf.convert_tokens_to_ids(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END, EOT)] == [
        ours.fim_begin_id, ours.fim_hole_id, ours.fim_end_id, ours.eot_id]


def test_special_tokens_are_single_ids(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    ids = {tok.bos_id, tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, tok.eot_id, tok.pad_id}
    assert len(ids) == 7 and max(ids) < 7
    # Source code that spells a special token is data, not a control token: it cannot inject one.
    spelled = "x = '<|EOT|>' + '<｜fim▁hole｜>'"
    assert not set(tok.encode(spelled)) & ids
    assert tok.decode(tok.encode(spelled)) == spelled


def test_chat_template_deepseek_style(tiny_tokenizer):
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "Now 2 and 2."}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (f"{BOS}Be brief.\n### Instruction:\nAdd 1 and 2.\n### Response:\n3\n{EOT}\n"
                    "### Instruction:\nNow 2 and 2.\n### Response:\n")
    default = hf.apply_chat_template(msgs[1:2], tokenize=False)
    assert default.startswith(BOS + "You are minicoder")


def test_tokenizer_train_bounded_sample(tiny_corpus, tmp_path):
    from conftest import run_cli
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--corpus", str(tiny_corpus), "--out", str(out), "--vocab-size", "600",
                   "--sample-bytes", "50000", check=True)
    assert "600 tokens" in proc.stdout
    assert Tokenizer(out).vocab_size == 600
