"""What a server operator and concurrent clients notice: `/metrics` values after known traffic, simultaneous
streaming clients each getting the text they would get alone (one of them leaving mid-stream included), and
streams that fall behind the engine catching up in one event per choice."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from minicoder.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from minicoder.server import ServerSettings, create_app
from minicoder.server.generation import Generation

from conftest import save_tiny_llama, serve_in_thread

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["def fibonacci(n):", "class Greeter:", "import os\n", "for i in range(", "def add(a, b):",
           "x = [", "if __name__ ==", "return f\"Hello"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Peaked predictions: batched and single-request float sums cannot flip a near-tie argmax.
    return save_tiny_llama(tmp_path_factory.mktemp("peaked"), initializer_range=0.3)


@pytest.fixture()
def server(model_dir):
    """A fresh server per test: metric values start from zero."""
    app = create_app(AsyncEngine(Engine(model_dir, EngineConfig(max_num_seqs=8))), ServerSettings(model_name="tiny"))
    with serve_in_thread(app) as url:
        yield url


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0] + ("{" + name.split(",")[-1] if "finish_reason" in name else "")] = float(value)
    return values


def test_metrics_count_known_traffic(server):
    usages = []
    for max_tokens in (3, 5, 7):
        body = {"prompt": "def fibonacci(n):", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        usages.append(httpx.post(server + "/v1/completions", json=body, timeout=60).json()["usage"])
    m = metrics(server)
    assert m['minicoder_requests_total{finish_reason="length"}'] == 3
    assert m["minicoder_generation_tokens_total"] == 3 + 5 + 7
    assert m["minicoder_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert m["minicoder_time_to_first_token_seconds_count"] == 3
    # The same prompt three times: the second and third find its full blocks in the prefix cache.
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert m["minicoder_prefix_cache_hit_tokens_total"] == cached
    assert m["minicoder_prefix_cache_queried_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert m["minicoder_num_requests_running"] == 0 and m["minicoder_kv_cache_blocks_total"] > 0


def stream_text(url: str, body: dict, stop_after: int | None = None) -> str:
    """A streamed completion's text; with `stop_after`, the client hangs up after that many chunks."""
    text, chunks = "", 0
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    break
    return text


def test_simultaneous_streams_get_what_they_get_alone_and_a_leaver_disturbs_none(server):
    bodies = [{"prompt": p, "max_tokens": 24, "ignore_eos": True,
               **({"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 100 + i})}
              for i, p in enumerate(PROMPTS)]
    alone = [stream_text(server, b) for b in bodies]
    assert len(set(alone)) == len(alone)
    together: list[str | None] = [None] * len(bodies)
    leaver = 3

    def client(i: int):
        together[i] = stream_text(server, bodies[i], stop_after=2 if i == leaver else None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (a, b) in enumerate(zip(alone, together)):
        if i != leaver:
            assert b == a, f"client {i}"
    assert together[leaver] != alone[leaver] and alone[leaver].startswith(together[leaver])
    m = metrics(server)
    assert m['minicoder_requests_total{finish_reason="abort"}'] == 1  # the leaver's request was cancelled
    assert m['minicoder_requests_total{finish_reason="length"}'] == 2 * len(bodies) - 1


def test_a_stream_that_falls_behind_catches_up_in_one_event(model_dir):
    """The engine runs ahead while the consumer is away; the consumer then gets all the queued tokens of its
    choice as one output (one SSE event), with the same text and tokens as step-by-step streaming."""
    engine = AsyncEngine(Engine(model_dir))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = engine.prompts.completion("def fibonacci(n):")

    async def run() -> tuple[list, list]:
        prompt_and_params = [(prompt, params)]
        live = Generation(engine, "live", prompt_and_params)
        await live.start()
        step_by_step = [out async for _, out in live.stream()]
        late = Generation(engine, "late", prompt_and_params)
        await late.start()
        while not engine.engine.stats().running and engine.engine.has_unfinished():
            await asyncio.sleep(0.01)
        while engine.engine.has_unfinished():  # the consumer is away until the request is done
            await asyncio.sleep(0.01)
        caught_up = [out async for _, out in late.stream()]
        await engine.close()
        return step_by_step, caught_up

    step_by_step, caught_up = asyncio.run(run())
    assert len(step_by_step) == 12
    assert len(caught_up) == 1
    [out] = caught_up
    assert out.finished and out.delta_token_ids == out.token_ids == step_by_step[-1].token_ids
    assert out.delta_text == "".join(o.delta_text for o in step_by_step) == out.text
