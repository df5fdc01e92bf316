"""The APIs editors and harnesses speak, tried with their own clients or their exact request shapes:
llama.cpp's /infill as llama.vim and llama.vscode send it, the real `ollama` client against a uvicorn
server, Tabby's request body and Tabby's own agent (npm `tabby-agent`, over its JSON-lines stdio protocol), vLLM's tokenizer routes as lm-eval's remote tokenizer calls them,
`input_extra` on /v1/completions, and `--repo` context (BM25) reaching the prompt, refreshed on change."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from fastapi.testclient import TestClient

from minicoder.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from minicoder.server import ServerSettings, create_app
from minicoder.server.llamacpp import LineGuard, pick_fields
from minicoder.server.repo_index import RepoIndex, chunk_file, code_terms

from conftest import run_cli, save_tiny_llama, serve_in_thread

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")

HELPER = '''import math


def rotate_quaternion_helper(vector, angle):
    """Rotate a vector by an angle around the z axis."""
    c, s = math.cos(angle), math.sin(angle)
    return (c * vector[0] - s * vector[1], s * vector[0] + c * vector[1], vector[2])
'''
OTHER = '''def unrelated_printer(text):
    print(text.upper())
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp(MODEL), context=512)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / "geometry.py").write_text(HELPER)
    (root / "printing.py").write_text(OTHER)
    (root / "notes.bin").write_bytes(b"\x00\x01")  # not source code: not indexed
    return root


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second engine on the same weights, to compute what the server should answer."""
    return Engine(model_dir)


def greedy(engine: Engine, ids: list[int], n: int) -> str:
    return engine.run_to_completion([ids], SamplingParams(max_new_tokens=n))[0].text


@pytest.fixture(scope="module")
def server(model_dir, repo):
    """A real uvicorn server (with --repo) on a free port, in a thread."""
    app = create_app(AsyncEngine(Engine(model_dir, EngineConfig())), ServerSettings(model_name=MODEL, repo=str(repo)))
    state = app.state.server
    with serve_in_thread(app) as url:
        yield SimpleNamespace(url=url, state=state, engine=state.engine.engine)


@pytest.fixture(scope="module")
def client(model_dir):
    """The app in-process, without --repo."""
    with TestClient(create_app(AsyncEngine(Engine(model_dir)), ServerSettings(model_name=MODEL))) as c:
        yield c


def prompts_of(client):
    return client.app.state.server.prompts


# --- llama.cpp /infill -------------------------------------------------------------------------------------
RING = [{"text": "def sub(a, b):\n    return a - b\n", "time": [1733000000, 125000], "filename": "ops.py"},
        {"text": "class Greeter:\n    pass\n", "time": [1733000001, 5], "filename": "greet.py"}]


def test_llama_vim_warm_up_then_fim_reuses_the_cache(client, reference):
    # s:ring_update(): extra context only, nothing to predict; response_fields [""] -> an empty object
    warm = client.post("/infill", json={
        "input_prefix": "", "input_suffix": "", "input_extra": RING, "prompt": "", "n_predict": 0,
        "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1, "response_fields": [""]})
    assert warm.status_code == 200 and warm.json() == {}
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
    # llama#fim(): the exact body llama.vim builds
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n", "input_extra": RING,
            "prompt": "    return", "n_predict": 16, "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1500, "response_fields": fields}
    r = client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert sorted(out) == sorted(fields)  # flattened keys, exactly what llama.vim reads
    assert isinstance(out["content"], str) and out["truncated"] is False
    assert out["tokens_cached"] >= 16  # the ring chunks' blocks, computed by the warm-up request
    assert out["timings/prompt_n"] + out["tokens_cached"] > out["tokens_cached"]
    assert 1 <= out["timings/predicted_n"] <= 16

    # greedy, no indentation / time limit: the content is what the engine writes for that prompt
    files = [(c["filename"], c["text"]) for c in RING]
    ids = prompts_of(client).infill("def add(a, b):\n    return", "\n\nprint(add(1, 2))\n", files).ids
    full = client.post("/infill", json={**body, "temperature": 0, "n_indent": 0, "t_max_predict_ms": -1,
                                        "response_fields": None}).json()
    assert full["tokens_evaluated"] == len(ids) and full["content"] == greedy(reference, ids, 16)
    assert full["generation_settings"]["samplers"] == ["top_k", "top_p"]  # "infill" is not one minicoder has
    assert "# ops.py\ndef sub(a, b):" in full["prompt"]


def test_llama_vscode_requests(client):
    chunks = [{"text": "import os\n\nROOT = os.getcwd()\n", "time": 1733000000000, "filename": "/src/cfg.py"}]
    # updateExtraContext(): createRequestPayload(noPredict=true, ...)
    warm = client.post("/infill", json={"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "",
                                        "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                                        "t_max_predict_ms": 1})
    assert warm.status_code == 200
    assert warm.json()["content"] == "" and warm.json()["tokens_predicted"] == 0
    # getFIMCompletion(): createRequestPayload(false, ...) with defaultRequestParams and n_indent
    r = client.post("/infill", json={"input_prefix": "def main():\n", "input_suffix": "\n", "input_extra": chunks,
                                     "prompt": "    print(", "n_predict": 24, "top_k": 40, "top_p": 0.99,
                                     "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
                                     "n_indent": 4, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000})
    out = r.json()
    assert r.status_code == 200 and isinstance(out["content"], str)
    assert set(out["timings"]) >= {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                                   "predicted_per_second"}
    assert out["tokens_cached"] > 0 and out["truncated"] is False and out["stop"] is True


def test_infill_stream_equals_the_full_answer(client):
    body = {"input_prefix": "class Greeter:\n", "input_suffix": "\n", "prompt": "    def", "n_predict": 12,
            "temperature": 0}
    full = client.post("/infill", json=body).json()
    with client.stream("POST", "/infill", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["stop"] for e in events][-1] is True and not any(e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == full["content"]
    assert events[-1]["tokens_predicted"] == full["tokens_predicted"]


def test_infill_cuts_what_does_not_fit(client):
    big = [{"filename": f"f{i}.py", "text": "x = 1\n" * 60} for i in range(6)]
    out = client.post("/infill", json={"input_prefix": "y = 2\n" * 300, "input_suffix": "z = 3\n" * 100,
                                       "input_extra": big, "n_predict": 8, "temperature": 0}).json()
    assert out["truncated"] is True and out["tokens_evaluated"] + 8 <= 512
    assert out["generation_settings"]["input_extra_used"] < len(big)


@pytest.mark.parametrize("body, param", [
    ({"n_predict": 512}, "n_predict"), ({"n_predict": -3}, "n_predict"), ({"input_extra": [{"filename": "a"}]},
                                                                          "input_extra.0.text"),
    ({"top_p": 0}, "top_p"), ({"input_prefix": 3}, "input_prefix"), ({"grammar": "root ::= [a-z]+"}, "grammar")])
def test_infill_bad_input(client, body, param):
    r = client.post("/infill", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_line_guard_n_indent_and_time_limit():
    guard = LineGuard(n_indent=4, t_max_predict_ms=-1)
    sent = guard.add("x + 1\n    y = 2\n") + guard.add("  \n") + guard.add("  z")
    assert sent == "x + 1\n    y = 2\n  \n" and guard.ended  # a blank line passes; "  z" is indented less
    assert guard.text == sent
    first = LineGuard(n_indent=4, t_max_predict_ms=-1)
    assert first.add("return 1") == "return 1" and not first.ended  # the cursor's own line is never checked
    timed = LineGuard(n_indent=0, t_max_predict_ms=1)
    timed.add("a")
    assert not timed.timed_out(time.perf_counter() - 1)  # no complete line yet
    timed.add("\n")
    assert timed.timed_out(time.perf_counter() - 1)
    assert pick_fields({"a": 1, "t": {"x": 2}}, ["a", "t/x", "t/y", ""]) == {"a": 1, "t/x": 2}


# --- Ollama, with the ollama client -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ollama_client(server):
    import ollama

    return ollama.Client(host=server.url, timeout=60)


def test_ollama_list_show_ps_version(ollama_client, server):
    models = ollama_client.list().models
    assert [m.model for m in models] == [f"{MODEL}:latest"]
    assert models[0].size > 0 and models[0].details.family == "llama"
    shown = ollama_client.show(MODEL)
    assert "insert" in shown.capabilities and shown.modelinfo["llama.context_length"] == server.state.context
    assert ".Suffix" in shown.template and "<｜fim▁hole｜>{{ .Suffix }}" in shown.template  # Continue's FIM check
    assert shown.modelinfo["general.parameter_count"] == sum(
        p.numel() for p in server.engine.runner.model.parameters())
    assert [m.model for m in ollama_client.ps().models] == [f"{MODEL}:latest"]
    assert requests.get(server.url + "/api/version").json()["version"]


def test_ollama_generate_with_suffix_streaming_and_not(ollama_client, server, reference):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    options = {"temperature": 0, "num_predict": 10}
    r = ollama_client.generate(model=MODEL, prompt=prefix, suffix=suffix, options=options)
    ids = server.state.fim.prompt(prefix, suffix, reserve=10, cut_code=False).ids
    assert r.done and r.done_reason in ("stop", "length") and r.response == greedy(reference, ids, 10)
    assert r.prompt_eval_count == len(ids) and 1 <= r.eval_count <= 10 and r.total_duration > 0
    parts = list(ollama_client.generate(model=MODEL, prompt=prefix, suffix=suffix, options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == r.response and parts[-1].eval_count == r.eval_count

    raw = ollama_client.generate(model=f"{MODEL}:latest", prompt="def fibonacci(n):", raw=True, options=options,
                                 keep_alive="5m")
    assert raw.response == greedy(reference, reference.prompts.completion("def fibonacci(n):"), 10)
    assert raw.context[: len(reference.prompts.completion("def fibonacci(n):"))] == \
        reference.prompts.completion("def fibonacci(n):")


def test_ollama_chat(ollama_client, reference):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Say hi."}]
    r = ollama_client.chat(model=MODEL, messages=messages, options={"temperature": 0, "num_predict": 8})
    assert r.message.role == "assistant" and r.done
    assert r.message.content == greedy(reference, reference.prompts.chat(messages), 8)
    streamed = list(ollama_client.chat(model=MODEL, messages=messages, stream=True,
                                       options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.message.content for p in streamed) == r.message.content and streamed[-1].done


def test_ollama_format_json_and_schema_constrain_the_output(ollama_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "lang": {"enum": ["py", "rs"]}},
              "required": ["ok", "lang"], "additionalProperties": False}
    r = ollama_client.generate(model=MODEL, prompt="hi", format=schema, options={"temperature": 0})
    assert r.done_reason == "stop" and set(json.loads(r.response)) == {"ok", "lang"}
    messages = [{"role": "user", "content": "Answer in JSON."}]
    parts = list(ollama_client.chat(model=MODEL, messages=messages, format="json", stream=True,
                                    options={"temperature": 1.0, "seed": 3, "num_predict": 400}))
    assert parts[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(p.message.content for p in parts)), dict)


def test_ollama_errors(ollama_client, server):
    import ollama

    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.generate(model="llama3", prompt="hi")
    assert e.value.status_code == 404 and "llama3" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.generate(model=MODEL, prompt="hi", options={"mirostat": 2})
    assert e.value.status_code == 400 and "mirostat" in e.value.error
    for fmt in ("xml", {"type": "nonsense"}):  # (the ollama client itself refuses "xml" before sending it)
        r = requests.post(server.url + "/api/chat", json={"model": MODEL, "format": fmt, "stream": False,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"].startswith("format"), r.text
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.generate(model=MODEL, prompt="x = ", suffix="\n", system="Be brief.")
    assert e.value.status_code == 400 and "system" in e.value.error
    r = requests.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["error"].startswith("keep_alive")


# --- Tabby --------------------------------------------------------------------------------------------------
def test_tabby_health_and_segments_completion(client, reference):
    assert client.get("/v1/health").json()["model"] == MODEL
    segments = {"prefix": "def area(r):\n    return ", "suffix": "\n", "filepath": "shapes.py",
                "declarations": [{"filepath": "consts.py", "body": "PI = 3.14159\n"}],
                "relevant_snippets_from_changed_files": [{"filepath": "circle.py", "body": "def circ(r):\n"
                                                          "    return 2 * PI * r\n", "score": 0.7}]}
    r = client.post("/v1/completions", json={"language": "python", "segments": segments, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and [c["index"] for c in body["choices"]] == [0]
    files = [("circle.py", "def circ(r):\n    return 2 * PI * r\n"), ("consts.py", "PI = 3.14159\n")]
    ids = prompts_of(client).infill(segments["prefix"], "\n", files, "shapes.py").ids
    assert ids != prompts_of(client).infill(segments["prefix"], "\n").ids
    assert body["choices"][0]["text"] == greedy(reference, ids, 64)
    # an OpenAI body on the same path still reaches the OpenAI route
    assert client.post("/v1/completions", json={"prompt": "def", "max_tokens": 2}).json()["object"] == "text_completion"
    bad = client.post("/v1/completions", json={"language": "python", "segments": {"suffix": "x"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "segments.prefix"


TABBY_AGENT = Path(__file__).resolve().parents[1] / "build/npm/node_modules/tabby-agent/dist/cli.js"


class JsonLineAgent:
    """tabby-agent's stdio protocol: `[id, {"func", "args"}]` lines in, `[id, result]` lines out (id 0: events)."""

    def __init__(self, home: Path):
        assert TABBY_AGENT.is_file(), f"{TABBY_AGENT} is missing: run `make install` (npm install tabby-agent)"
        env = {**os.environ, "HOME": str(home), "TABBY_DISABLE_USAGE_COLLECTION": "1"}
        self.proc = subprocess.Popen(["node", str(TABBY_AGENT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.events, self.next_id = [], 1

    def call(self, func: str, *args, timeout: float = 60):
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.proc.stdin.write(json.dumps([request_id, {"func": func, "args": list(args)}]) + "\n")
        self.proc.stdin.flush()
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            assert line, "tabby-agent exited"
            reply_id, result = json.loads(line)
            if reply_id == request_id:
                return result
            self.events.append(result)
        raise AssertionError(f"tabby-agent did not answer {func}")

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def test_tabby_agent_completes_through_the_server(server, tmp_path):
    """Tabby's own editor agent (npm tabby-agent 1.5.0): health check, then a completion it builds segments for."""
    agent = JsonLineAgent(tmp_path)
    try:
        assert agent.call("initialize", {"config": {"server": {"endpoint": server.url}},
                                         "clientProperties": {"session": {"client": "minicoder-test"}}}) is True
        assert agent.call("getStatus") == "ready"  # GET /v1/health answered with a model
        assert agent.call("getServerHealthState")["model"] == MODEL
        before = server.state.metrics.requests.copy()
        text = "import math\n\n\ndef circle_area(r):\n    return \n\n\nprint(circle_area(2))\n"
        reply = agent.call("provideCompletions", {"filepath": str(tmp_path / "shapes.py"), "language": "python",
                                                  "text": text, "position": text.index("return ") + 7,
                                                  "manually": True})
        assert reply["id"].startswith("cmpl-")  # the id of minicoder's Tabby route, not an agent placeholder
        assert len(reply["choices"]) <= 1 and all(isinstance(c["text"], str) for c in reply["choices"])
        assert sum(server.state.metrics.requests.values()) > sum(before.values())
    finally:
        agent.close()


# --- vLLM tokenizer routes (lm-eval's remote tokenizer) -----------------------------------------------------
def test_tokenizer_routes(client):
    info = client.get("/tokenizer_info").json()
    tok = client.app.state.server.tokenizer
    assert info["eos_token"] == tok.eos_token and info["chat_template"]
    # RemoteTokenizer.eos_token_id: encode(eos_token, add_special_tokens=False)[0]
    r = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert r["tokens"] == [tok.eos_token_id] and r["count"] == 1 and r["max_model_len"] == 512
    text = "def fibonacci(n):\n    return n"
    ids = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert ids["tokens"] == tok.encode(text) and len(ids["token_strs"]) == ids["count"]
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": plain}).json()["prompt"] == text
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == client.app.state.server.prompts.chat([{"role": "user", "content": "hi"}])
    bad = client.post("/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens.1"
    assert client.post("/tokenize", json={}).status_code == 400


# --- repository context -------------------------------------------------------------------------------------
def test_input_extra_on_openai_completions(client, reference):
    files = [{"filename": "ops.py", "text": "def sub(a, b):\n    return a - b\n"}]
    body = {"prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 6, "temperature": 0, "input_extra": files}
    r = client.post("/v1/completions", json=body).json()
    ids = prompts_of(client).infill(body["prompt"], "\n", [("ops.py", files[0]["text"])]).ids
    assert r["usage"]["prompt_tokens"] == len(ids) and r["choices"][0]["text"] == greedy(reference, ids, 6)
    bad = client.post("/v1/completions", json={"prompt": "x", "input_extra": files})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_extra"


def test_repo_snippet_from_another_file_reaches_the_prompt(server, repo):
    prefix = "from geometry import rotate_quaternion_helper\n\npoint = rotate_quaternion_helper(v, angle)\n"
    r = requests.post(server.url + "/infill", json={"input_prefix": prefix, "prompt": "x = ", "n_predict": 2,
                                                    "temperature": 0}).json()
    assert "# geometry.py\n" in r["prompt"] and "def rotate_quaternion_helper(vector, angle):" in r["prompt"]
    assert "unrelated_printer" not in r["prompt"]  # BM25: the other file does not match
    # a file added while serving is found once the watcher re-indexes
    index = server.state.fim.index
    builds = index.builds
    (repo / "later.py").write_text("def zebra_stripes_painter(canvas):\n    return canvas\n")
    deadline = time.time() + 15
    while index.builds == builds:
        assert time.time() < deadline, "the repository index was not rebuilt"
        time.sleep(0.1)
    r = requests.post(server.url + "/infill", json={"input_prefix": "zebra_stripes_painter(c)\n", "n_predict": 1}).json()
    assert "# later.py\ndef zebra_stripes_painter" in r["prompt"]


def test_requests_from_one_file_hit_the_prefix_cache(server):
    """An editor session: the user types one line, a request per keystroke; the repository context and
    the lines above stay, so all but the first request reuse most of the prompt from the prefix cache."""
    prefix = "import math\n\n\ndef turn(v, angle):\n    return rotate_quaternion_helper(v, angle)\n\n\n"
    line = "def scale(v, k):"
    cached, total = 0, 0
    for i in range(1, len(line) + 1):
        r = requests.post(server.url + "/infill", json={"input_prefix": prefix, "prompt": line[:i],
                                                        "input_suffix": "\n", "n_predict": 2, "temperature": 0}).json()
        if i > 1:
            cached, total = cached + r["tokens_cached"], total + r["tokens_evaluated"]
    assert cached / total > 0.6


def test_repo_index_unit(tmp_path):
    assert code_terms("parseJson(x_value)") == ["parsejson", "parse", "json", "x_value", "x", "value"]
    chunks = chunk_file("a.py", "a = 1\n" * 10 + "\n" + "b = 2\n" * 10, max_lines=16)
    assert [c.start_line for c in chunks] == [1, 12] and "".join(c.text for c in chunks).count("\n") == 21
    (tmp_path / "a.py").write_text("def alpha_function():\n    return 1\n")
    (tmp_path / "b.py").write_text("def alpha_function_caller():\n    return alpha_function()\n")
    index = RepoIndex(tmp_path, count_tokens=len)
    assert [p for p, _ in index.snippets("alpha_function()\n", exclude_path="b.py")] == ["a.py"]
    assert [p for p, _ in index.snippets("alpha_function()\n", exclude_path=str(tmp_path / "a.py"))] == ["b.py"]
    assert index.snippets("alpha_function()\n", budget=5) == []  # nothing fits 5 tokens
    assert index.snippets("zzz_nothing\n") == []


def test_serve_repo_flag_errors(tmp_path):
    proc = run_cli("serve", str(tmp_path), "--repo", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "--repo" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("serve", str(tmp_path), "--max-num-batched-tokens", "0")
    assert proc.returncode == 2 and "--max-num-batched-tokens must be at least 1" in proc.stderr


def test_a_cut_prefix_stays_put_while_the_user_types(client):
    """Over the budget, the prefix loses whole lines from its start in steps, so typing on the last line
    does not move the cut (which would change every token after it and miss the prefix cache)."""
    prompts = prompts_of(client)
    body = "".join(f"value_{i} = compute({i})\n" for i in range(200))
    a = prompts.infill(body + "res", "\n", budget=300)
    b = prompts.infill(body + "result = ", "\n", budget=300)
    assert a.truncated and b.truncated and len(a.ids) <= 300 and len(b.ids) <= 300
    start = prompts.text("".join(body.splitlines(keepends=True)[-5:]))  # near the end: kept in both
    assert len(os.path.commonprefix([a.ids, b.ids])) >= len(a.ids) - len(start) - 4
