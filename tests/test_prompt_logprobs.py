"""Prompt log-probabilities over HTTP (`echo` + `logprobs` on /v1/completions, what lm-evaluation-harness scores
log-likelihoods with) equal transformers' log_softmax at every position of the same checkpoint, for text and
token-id prompts, prompts longer than a prefill chunk, after the prefix cache holds the prompt, and streamed."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from minicoder.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from minicoder.server import ServerSettings, create_app

from conftest import SAMPLE_CODE, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 32  # prefill tokens per step: longer prompts are computed over several steps
TOLERANCE = 1e-4  # fp32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("peaked"), initializer_range=0.3)


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of transformers' logits at every position: row p scores the token at p + 1."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


@pytest.fixture(scope="module")
def client(model_dir):
    engine = AsyncEngine(Engine(model_dir, EngineConfig(max_num_batched_tokens=CHUNK)))
    with TestClient(create_app(engine, ServerSettings(model_name="tiny"))) as c:
        yield c


def prompt_ids(client, text: str) -> list[int]:
    return client.app.state.server.prompts.completion(text)


def assert_prompt_logprobs(lp: dict, ids: list[int], expected: torch.Tensor, top_n: int, tokenizer):
    """lp: a completions `logprobs` object whose first len(ids) entries are the prompt's."""
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    got = torch.tensor(lp["token_logprobs"][1:n])
    want = expected[torch.arange(n - 1), torch.tensor(ids[1:])]
    assert torch.allclose(got, want, atol=TOLERANCE), (got - want).abs().max()
    for p in range(1, n):
        top = lp["top_logprobs"][p]
        assert 1 <= len(top) <= top_n  # tokens that decode alike (partial UTF-8 bytes) share one key
        assert max(top.values()) == pytest.approx(expected[p - 1].max().item(), abs=TOLERANCE)
    assert lp["tokens"][:n] == [tokenizer.decode([t]) for t in ids]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_text_prompt_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(client, reference, tokenizer):
    text = "def fibonacci(n):\n    a, b = 0, 1"
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = prompt_ids(client, text)
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids)  # the prompt only: nothing generated
    assert_prompt_logprobs(lp, ids, reference(ids), top_n=3, tokenizer=tokenizer)
    # Offsets index the echoed text: each token's text starts where its offset says.
    for token, offset in zip(lp["tokens"][1:], lp["text_offset"][1:]):
        assert text[offset : offset + len(token)] == token
    assert r.json()["usage"]["completion_tokens"] == 0


def test_lm_eval_loglikelihood_request_on_token_ids_longer_than_a_prefill_chunk(client, reference, tokenizer):
    """The exact body lm-eval's local-completions sends for a loglikelihood request."""
    ids = prompt_ids(client, SAMPLE_CODE)[: 3 * CHUNK + 5]
    assert len(ids) > 2 * CHUNK
    body = {"model": "tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    expected = reference(ids)
    assert_prompt_logprobs(lp, ids, expected, top_n=1, tokenizer=tokenizer)
    # Then the one generated (greedy) token: the most likely one after the prompt.
    assert len(lp["token_logprobs"]) == len(ids) + 1
    echoed = r.json()["choices"][0]["text"]
    assert lp["text_offset"][-1] == len(tokenizer.decode(ids, skip_special_tokens=True))  # the generated token's
    assert echoed[lp["text_offset"][-1]:] == lp["tokens"][-1] or "\ufffd" in lp["tokens"][-1]
    assert lp["token_logprobs"][-1] == pytest.approx(expected[-1].max().item(), abs=TOLERANCE)


def test_prompt_logprobs_after_the_prefix_cache_holds_the_prompt(client, reference, tokenizer):
    text = SAMPLE_CODE[:400]
    ids = prompt_ids(client, text)
    warm = {"prompt": text, "max_tokens": 1, "temperature": 0}
    client.post("/v1/completions", json=warm)
    again = client.post("/v1/completions", json=warm).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= CHUNK  # the cache holds the prompt now
    r = client.post("/v1/completions", json={**warm, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # every position recomputed
    assert_prompt_logprobs(r["choices"][0]["logprobs"], ids, reference(ids), top_n=2, tokenizer=tokenizer)


def test_streamed_echo_carries_the_prompt_logprobs_in_the_first_chunk(client, reference, tokenizer):
    text = "class Greeter:\n    def greet(self):"
    ids = prompt_ids(client, text)
    body = {"prompt": text, "max_tokens": 4, "echo": True, "logprobs": 1, "temperature": 0, "ignore_eos": True,
            "stream": True}
    chunks = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[0]["text"].startswith(text)
    merged = {k: sum((c["logprobs"][k] for c in chunks if c["logprobs"]), []) for k in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert len(merged["tokens"]) == len(ids) + 4
    assert_prompt_logprobs(merged, ids, reference(ids), top_n=1, tokenizer=tokenizer)
    whole = "".join(c["text"] for c in chunks)
    assert merged["text_offset"] == sorted(merged["text_offset"]) and merged["text_offset"][len(ids)] == len(text)
    for token, offset in zip(merged["tokens"], merged["text_offset"]):  # each offset points at its token's text
        if token not in tokenizer.all_special_tokens and "\ufffd" not in token:
            assert whole[offset : offset + len(token)] == token


def test_bad_echo_requests_are_a_400_naming_the_field(client):
    r = client.post("/v1/completions", json={"prompt": "def", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": "def", "suffix": "x", "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_engine_prompt_logprobs_survive_preemption_and_match(model_dir, reference):
    """Two long prompts in a KV pool too small for both: one is preempted mid-generation and recomputed;
    its prompt logprobs are recorded once and still match."""
    engine = Engine(model_dir, EngineConfig(max_num_batched_tokens=CHUNK, num_blocks=14, block_size=16))
    ids = engine.prompts.completion(SAMPLE_CODE)[:90]
    other = ids[::-1]
    params = SamplingParams(max_new_tokens=40, prompt_logprobs=0, ignore_eos=True)
    outs = engine.run_to_completion([ids, other], params)
    assert engine.stats().preemptions > 0
    for prompt, out in zip([ids, other], outs):
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        want = reference(prompt)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert len(out.prompt_logprobs) == len(prompt)
        assert torch.allclose(got, want, atol=TOLERANCE)


def test_transformers_backend_prompt_logprobs_match(model_dir, reference):
    """Models the native runner does not load run through transformers: chunked prompts there too."""
    engine = Engine(model_dir, EngineConfig(backend="transformers", max_num_batched_tokens=CHUNK))
    ids = engine.prompts.completion(SAMPLE_CODE)[: 2 * CHUNK + 7]
    [out] = engine.run_to_completion([ids], SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    want = reference(ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert out.prompt_logprobs[0] is None and torch.allclose(got, want, atol=TOLERANCE)
