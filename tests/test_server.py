"""The HTTP server: seed 001's route (its JSON, curl command and request.py), the OpenAI API through the
official client and LangChain against a real uvicorn server, bad input, 429, 401, client disconnects,
metrics and health. A tiny random Llama with a tokenizer trained here; each app gets its own engine."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest
import requests
from fastapi.testclient import TestClient

from minicoder.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from minicoder.server import ServerSettings, create_app

from conftest import save_tiny_llama, serve_in_thread

CONTEXT = 512
MODEL = "tiny"
TOO_LONG = "x = 1\n" * 400  # more tokens than the context


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (minicoder's special tokens and chat template)."""
    return save_tiny_llama(tmp_path_factory.mktemp(MODEL), context=CONTEXT)


def make_app(model_dir, settings: ServerSettings | None = None, **engine_config):
    engine = AsyncEngine(Engine(model_dir, EngineConfig(**engine_config)))
    return create_app(engine, settings or ServerSettings(model_name=MODEL))


def engine_of(app) -> Engine:
    return app.state.server.engine.engine


@pytest.fixture(scope="module")
def client(model_dir):
    """The app in-process (fastapi TestClient)."""
    with TestClient(make_app(model_dir)) as c:
        yield c


@pytest.fixture(scope="module")
def server(model_dir):
    """A real uvicorn server on a free port, in a thread."""
    app = make_app(model_dir)
    with serve_in_thread(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=engine_of(app), metrics=app.state.server.metrics)


def wait_until_idle(engine: Engine, timeout: float = 10.0):
    deadline = time.time() + timeout
    while engine.has_unfinished() or engine.stats().running:
        assert time.time() < deadline, "the engine still has requests"
        time.sleep(0.02)


# --- seed 001 --------------------------------------------------------------------------------------------
TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def test_history_chat_request_and_missing_history(client):
    r = client.post("/", json={"prompt": "你好", "history": []})  # the seed's body, seed's defaults
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["response", "history", "status", "time"]
    assert body["history"] == [["你好", body["response"]]] and body["status"] == 200
    assert TIME.match(body["time"])

    r = client.post("/", json={"prompt": "def add(a, b):", "max_length": 8})  # no history: the seed crashed
    assert r.status_code == 200 and r.json()["history"] == [["def add(a, b):", r.json()["response"]]]

    history = [["hi", "hello"], ["what is 1+1", "2"]]
    r = client.post("/", json={"prompt": "thanks", "history": history, "max_length": 4, "top_p": 0.9, "top_k": 3,
                               "temperature": 0.5, "repetition_penalty": 1.2})
    assert r.status_code == 200 and r.json()["history"][:2] == history and len(r.json()["history"]) == 3


def test_history_chat_curl_and_request_py(server):
    """The seed's curl command and request.py, unchanged but for the address."""
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "-X", "POST", server.url, "-H", "Content-Type: application/json",
                              "-d", '{"prompt": "你好", "history": [], "max_length": 16}'],
                             capture_output=True, text=True, timeout=60)
        body = json.loads(out.stdout)
        assert body["status"] == 200 and body["history"][0][0] == "你好"

    def get_completion(prompt):  # request.py
        headers = {'Content-Type': 'application/json'}
        data = {"prompt": prompt, "history": []}
        response = requests.post(url=server.url, headers=headers, data=json.dumps(data))
        return response.json()['response']

    assert isinstance(get_completion('你好，帮我介绍一下DeepSeek-Coder-V2-Lite-Instruct大语言模型~'), str)


# --- OpenAI API through the official client ----------------------------------------------------------------
@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_completions(openai_client, server):
    engine = server.engine
    assert [m.id for m in openai_client.models.list().data] == [MODEL]
    prompt = "def fibonacci(n):"
    full = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason

    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    fim = openai_client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    assert fim.usage.prompt_tokens == len(engine.prompts.fim(prefix, suffix))
    [expected] = Engine(server.engine.model_path).run_to_completion([engine.prompts.fim(prefix, suffix)],
                                                           SamplingParams(max_new_tokens=8))
    assert fim.choices[0].text == expected.text

    many = openai_client.completions.create(model=MODEL, prompt=["def", "class"], n=2, max_tokens=6,
                                            temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == len(engine.tokenizer.encode("def")) + len(engine.tokenizer.encode("class"))
    assert many.usage.completion_tokens == 4 * 6
    again = openai_client.completions.create(model=MODEL, prompt=["def", "class"], n=2, max_tokens=6,
                                             temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # same seed, same text

    streamed = {}
    for chunk in openai_client.completions.create(model=MODEL, prompt="def", n=2, max_tokens=5, temperature=1.0,
                                                  seed=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert sorted(streamed) == [0, 1]


def test_openai_chat(openai_client):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write hello world."},
                {"role": "assistant", "content": "print('hello world')"},
                {"role": "user", "content": "Now in a function."}]
    full = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 20

    chunks = list(openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens

    scored = openai_client.chat.completions.create(model=MODEL, messages=messages[-1:], max_tokens=4,
                                                   temperature=0, logprobs=True, top_logprobs=2, n=2)
    for choice in scored.choices:
        assert len(choice.logprobs.content) == scored.usage.completion_tokens // 2
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)


def test_langchain_chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_tokens=8,
                                      temperature=0, max_retries=0)
    reply = llm.invoke("Write hello world in Python.")
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] >= 1
    streamed = "".join(chunk.content for chunk in llm.stream("Write hello world in Python."))
    assert streamed == reply.content


# --- greedy parity, logging --------------------------------------------------------------------------------
def test_greedy_completion_equals_engine_output(client, model_dir, caplog):
    prompt = "class Greeter:\n    def __init__(self"
    [expected] = Engine(model_dir).run_to_completion([prompt], SamplingParams(max_new_tokens=24))
    with caplog.at_level(logging.INFO, logger="minicoder.server"):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected.text
    lines = [rec.getMessage() for rec in caplog.records if r.json()["id"] in rec.getMessage()]
    assert len(lines) == 1 and "prompt tokens" in lines[0] and "first token" in lines[0] and "total" in lines[0]
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "echo": True})
    assert r.json()["choices"][0]["text"] == prompt + expected.text


# --- bad input ---------------------------------------------------------------------------------------------
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x",', 400, None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", 400, None),  # not an object
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [10**7]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": ["x"] * 200, "n": 2}, 400, "n"),  # more choices than the queue holds
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": HI, "model": "nope"}, 404, "model"),
    ("/", {"history": []}, 400, "prompt"),
    ("/", {"prompt": "hi", "history": [["only the question"]]}, 400, "history.0"),
    ("/", {"prompt": "hi", "history": [["q", 1]]}, 400, "history.0.1"),
    ("/", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/", {"prompt": "hi", "max_length": 0}, 400, "max_length"),
    ("/", {"prompt": TOO_LONG}, 400, "prompt"),
]


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_4xx_naming_the_field(client, route, body, status, param):
    if isinstance(body, bytes):
        r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_unknown_route_and_method(client):
    assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405


# --- queue bound, API key ------------------------------------------------------------------------------
def test_full_queue_gets_429_with_retry_after(model_dir):
    app = make_app(model_dir, max_waiting=1)
    with TestClient(app) as c:
        engine_of(app).submit("def", SamplingParams(max_new_tokens=2))  # fills the one waiting slot
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 'finish_reason="rejected"} 1' in c.get("/metrics").text
        wait_until_idle(engine_of(app))
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_api_key(model_dir):
    with TestClient(make_app(model_dir, ServerSettings(model_name=MODEL, api_key="s3cret"))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/", json={"prompt": "hi"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200


# --- client disconnects -----------------------------------------------------------------------------------
def test_disconnect_mid_stream_cancels_the_request(server):
    aborted = server.metrics.requests["abort"]
    body = {"prompt": "def", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    # the connection is closed: the server cancels the request and the engine frees its blocks
    wait_until_idle(server.engine)
    deadline = time.time() + 10
    while server.metrics.requests["abort"] == aborted:
        assert time.time() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert server.engine.kv.num_free_blocks == len(server.engine.kv.blocks)
    assert server.engine.generated_tokens < 10_000  # sanity: it did not run on for nobody


def test_disconnect_while_waiting_for_a_full_response_cancels_it(server):
    aborted = server.metrics.requests["abort"]
    before = server.engine.generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.2),
                   json={"prompt": "def", "max_tokens": 480, "ignore_eos": True, "temperature": 0})
    wait_until_idle(server.engine)
    deadline = time.time() + 10
    while server.metrics.requests["abort"] == aborted:
        assert time.time() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert server.engine.generated_tokens - before < 480
    assert server.engine.kv.num_free_blocks == len(server.engine.kv.blocks)


# --- health and metrics ------------------------------------------------------------------------------------
def test_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]
    client.post("/v1/completions", json={"prompt": "def", "max_tokens": 4})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            values[name_labels.split("{")[0]] = float(value)
    for name in ("minicoder_num_requests_running", "minicoder_num_requests_waiting",
                 "minicoder_generation_tokens_total", "minicoder_generation_tokens_per_second",
                 "minicoder_kv_cache_blocks_used", "minicoder_kv_cache_blocks_total", "minicoder_prefix_cache_hit_rate",
                 "minicoder_requests_total", "minicoder_time_to_first_token_seconds_count"):
        assert name in values, name
    assert values["minicoder_generation_tokens_total"] >= 4 and values["minicoder_kv_cache_blocks_total"] > 0


# --- behaviour over HTTP: stop strings, n and seed ---------------------------------------------------------
def sse_texts(url: str, body: dict) -> list[str]:
    """The text of each streamed /v1/completions chunk, in order."""
    texts = []
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts += [c["text"] for c in json.loads(line[6:])["choices"]]
    return texts


def test_stop_strings_over_http_end_the_text_before_them_streamed_or_not(server):
    greedy = {"prompt": "def fibonacci(n):", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = httpx.post(server.url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    stop = full[12:16]  # a piece in the middle of what the model writes
    assert len(stop) == 4 and full.index(stop) >= 1
    expected = full[:full.index(stop)]
    body = {**greedy, "stop": [stop]}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (expected, "stop")
    streamed = sse_texts(server.url, body)
    assert "".join(streamed) == expected
    # Held back until it cannot be the start of the stop string: no chunk ever shows part of the stop text
    # after the expected end.
    assert not any(stop in t for t in streamed)


def test_n_choices_differ_and_seed_makes_them_repeatable(server):
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 1234,
            "ignore_eos": True}
    first = [c["text"] for c in httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"]]
    again = [c["text"] for c in httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"]]
    assert first == again  # the same seed gives the same n choices
    assert len(set(first)) > 1  # choice i uses seed + i: they are not copies of one sample
    other = [c["text"] for c in httpx.post(server.url + "/v1/completions", json={**body, "seed": 99},
                                           timeout=60).json()["choices"]]
    assert other != first
