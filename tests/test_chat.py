"""`minicoder chat`: the REPL (commands, history, context clip), mode selection, and the command itself
fed through stdin. A tiny random Llama with a tokenizer trained here."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from minicoder.chat import ChatOptions, ChatSession, pick_mode, repl
from minicoder.engine import Engine, EngineConfig, SamplingParams

from conftest import save_tiny_llama

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("sft"))
    (path / "minicoder.json").write_text(json.dumps({"stage": "sft", "preset": "tiny"}))
    return path


@pytest.fixture(scope="module")
def engine(model_dir, one_thread):
    return Engine(model_dir, EngineConfig(max_num_seqs=1))


def greedy(max_new_tokens=6, **kw) -> ChatOptions:
    return ChatOptions(temperature=0, max_new_tokens=max_new_tokens, **kw)


def test_chat_reply_is_the_engine_output_and_history_is_kept(engine):
    session = ChatSession(engine, greedy(mode="chat"))
    reply = "".join(session.reply("Write hello world."))
    [expected] = engine.run_to_completion([engine.prompts.chat([{"role": "user", "content": "Write hello world."}])],
                                 SamplingParams(max_new_tokens=6))
    assert reply == expected.text and session.history == [("Write hello world.", reply)]
    second = engine.tokenizer.decode(session.prompt_ids("And in C?"))
    assert "Write hello world." in second and "And in C?" in second
    session.reset()
    assert "Write hello world." not in engine.tokenizer.decode(session.prompt_ids("And in C?"))


def test_history_is_clipped_to_max_seq_len(engine):
    session = ChatSession(engine, greedy(mode="chat", max_seq_len=120))
    for turn in ("first question", "second question", "third question"):
        "".join(session.reply(turn))
    ids = session.prompt_ids("fourth question")
    text = engine.tokenizer.decode(ids)
    assert len(ids) <= 120 and "fourth question" in text and "first question" not in text
    assert len(session.history) == 3  # the history itself is kept; only the prompt drops old turns


def test_raw_mode_continues_each_line_without_history(engine):
    session = ChatSession(engine, greedy(mode="raw"))
    reply = "".join(session.reply("def fibonacci(n):"))
    [expected] = engine.run_to_completion(["def fibonacci(n):"], SamplingParams(max_new_tokens=6))
    assert reply == expected.text and session.history == []
    assert session.prompt_ids("x = 1") == engine.tokenizer.encode("x = 1")


def test_repl_commands(engine):
    session = ChatSession(engine, greedy(mode="chat"))
    out = io.StringIO()
    repl(session, io.StringIO("hello\n/reset\n\n/unknown\nworld\n/exit\nnever read\n"), out)
    text = out.getvalue()
    assert "(history cleared)" in text and "unknown command /unknown" in text
    assert text.count("🤖: ") == 2 and "never read" not in text
    assert [user for user, _ in session.history] == ["world"]
    out = io.StringIO()
    repl(ChatSession(engine, greedy(mode="raw")), io.StringIO("def f("), out)  # end of input without /exit
    assert out.getvalue().count("🤖: ") == 1


def test_pick_mode(model_dir, tmp_path, engine):
    tokenizer = engine.tokenizer
    assert pick_mode(model_dir, tokenizer) == ("chat", "minicoder.json: stage 'sft'")
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "minicoder.json").write_text(json.dumps({"stage": "pretrain"}))
    assert pick_mode(pretrained, tokenizer)[0] == "raw"
    assert pick_mode(pretrained, tokenizer, "chat")[0] == "chat"
    foreign = tmp_path / "deepseek-coder-1.3b-instruct"
    foreign.mkdir()
    assert pick_mode(foreign, tokenizer)[0] == "chat"  # no minicoder.json: a chat template and an instruct name
    assert pick_mode(tmp_path, tokenizer)[0] == "raw"


def test_chat_command_through_stdin(model_dir, tmp_path):
    pretrained = tmp_path / "pretrained"
    shutil.copytree(model_dir, pretrained)
    (pretrained / "minicoder.json").write_text(json.dumps({"stage": "pretrain"}))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicoder.chat", str(pretrained), "--max-new-tokens", "4",
                           "--temperature", "0"], input="def add(a, b):\n/reset\nclass A:\n/exit\n",
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "raw mode" in proc.stderr and proc.stdout.count("🤖: ") == 2
    bad = subprocess.run([sys.executable, "-m", "minicoder.chat", str(tmp_path / "missing")], input="",
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
