"""One bad request must not harm the others: hostile sampling parameters are refused at submit, a failure
inside a step fails only the request that caused it, and sampling never raises on NaN or masked logits."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from minicoder.engine import AsyncEngine, Engine, EngineConfig, RequestFailed, SamplingParams
from minicoder.engine.request import Request
from minicoder.engine.sampler import sample

from conftest import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

INNOCENT = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(save_tiny_llama(tmp_path_factory.mktemp("tiny"), context=256), EngineConfig(max_num_seqs=8))


@pytest.fixture(scope="module")
def innocent_text(engine):
    [out] = engine.run_to_completion(["def add(a, b):"], INNOCENT)
    return out.text


# Each payload raised inside Engine.step and failed every request in the batch.
HOSTILE = [
    ("stop_token_ids", dict(stop_token_ids=[1_000_000_000], min_new_tokens=2, max_new_tokens=4)),
    ("stop_token_ids", dict(stop_token_ids=[2**80], min_new_tokens=2, max_new_tokens=4)),
    ("repetition_penalty", dict(repetition_penalty=1e-40, temperature=1.0)),
    ("repetition_penalty", dict(repetition_penalty=1e40, temperature=1.0)),
    ("temperature", dict(temperature=math.inf)),
    ("temperature", dict(temperature=math.nan)),
    ("top_p", dict(top_p=math.nan, temperature=1.0)),
    ("min_p", dict(min_p=math.nan, temperature=1.0)),
    ("presence_penalty", dict(presence_penalty=math.inf, temperature=1.0)),
    ("frequency_penalty", dict(frequency_penalty=-1e308 * 10, temperature=1.0)),
    ("stop", dict(stop=["x"] * 100_000)),
    ("stop", dict(stop=["y" * 100_000])),
    ("seed", dict(seed=2**70, temperature=1.0)),
]


@pytest.mark.parametrize("field,fields", HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
def test_hostile_parameters_are_refused_at_submit_and_the_batch_goes_on(engine, innocent_text, field, fields):
    innocent = engine.submit("def add(a, b):", INNOCENT)
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        engine.submit("def f():", SamplingParams(**fields))
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[innocent].finish_reason == "length" and outputs[innocent].text == innocent_text


def test_a_request_that_fails_in_sampling_fails_alone(engine, innocent_text):
    innocent = engine.submit("def add(a, b):", INNOCENT)
    victim = engine.submit("def f():", SamplingParams(max_new_tokens=8, min_new_tokens=4))
    engine.step()  # both admitted
    # A value that slipped past validation (here set behind its back) makes the batched sampler raise.
    engine.requests[victim].stop_token_ids = frozenset({10**9})
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[victim].finish_reason == "error" and outputs[victim].error
    assert outputs[innocent].finish_reason == "length" and outputs[innocent].text == innocent_text
    assert engine.kv.num_free_blocks == len(engine.kv.blocks)


@pytest.fixture(scope="module")
def hf_engine(tmp_path_factory):
    return Engine(save_tiny_llama(tmp_path_factory.mktemp("tiny-hf"), context=256),
                  EngineConfig(max_num_seqs=8, backend="transformers"))


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_a_request_whose_forward_fails_fails_alone(engine, hf_engine, innocent_text, monkeypatch, backend):
    engine = engine if backend == "native" else hf_engine
    innocent = engine.submit("def add(a, b):", INNOCENT)
    victim = engine.submit("class Greeter:", SamplingParams(max_new_tokens=8))
    forward = engine.runner.forward

    decoding = []

    def failing_forward(chunks):
        out = forward(chunks)  # the innocent chunk's cache has advanced when the step fails
        decoding.extend(c.request_id for c in chunks if c.start > 0)
        if victim in decoding and any(c.request_id == victim for c in chunks):  # from its first decode step on
            raise RuntimeError("simulated kernel failure")
        return out

    monkeypatch.setattr(engine.runner, "forward", failing_forward)
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[victim].finish_reason == "error"
    assert outputs[innocent].finish_reason == "length" and outputs[innocent].text == innocent_text
    assert engine.kv.num_free_blocks == len(engine.kv.blocks)


def _request(engine, **fields) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**fields), tokenizer=engine.tokenizer, vocab_size=engine.vocab_size,
                   eos_token_ids=set(), max_total_tokens=100)


@pytest.mark.parametrize("row", ["nan", "all-masked", "inf"])
def test_sampling_is_nan_safe(engine, row):
    vocab = engine.vocab_size
    logits = torch.randn(2, vocab)
    if row == "nan":
        logits[0] = float("nan")
    elif row == "all-masked":
        logits[0] = float("-inf")
    else:
        logits[0, 7] = float("inf")
    requests = [_request(engine, temperature=1.0, top_p=0.9, seed=1), _request(engine, temperature=0.7, seed=2)]
    tokens = sample(logits, requests)
    assert all(0 <= t < vocab for t in tokens)
    if row == "inf":
        assert tokens[0] == 7


def test_async_engine_fails_only_the_bad_stream(engine, innocent_text, monkeypatch):
    async def run():
        async_engine = AsyncEngine(engine)
        forward = engine.runner.forward

        def failing_forward(chunks):
            if any(c.request_id == "bad" for c in chunks):
                raise RuntimeError("simulated kernel failure")
            return forward(chunks)

        monkeypatch.setattr(engine.runner, "forward", failing_forward)

        async def collect(prompt, params, rid):
            text = ""
            async for out in async_engine.stream(prompt, params, rid):
                text += out.delta_text
            return text

        results = await asyncio.gather(collect("def add(a, b):", INNOCENT, "good"),
                                       collect("class X:", SamplingParams(max_new_tokens=8), "bad"),
                                       return_exceptions=True)
        await async_engine.close()
        return results

    good, bad = asyncio.run(run())
    assert good == innocent_text
    assert isinstance(bad, RequestFailed)


def test_a_step_failure_no_request_explains_leaves_the_engine_serving(engine, innocent_text, monkeypatch):
    async def run():
        async_engine = AsyncEngine(engine)
        schedule = engine.scheduler.schedule
        calls = {"n": 0}

        def broken_once():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated scheduler bug")
            return schedule()

        monkeypatch.setattr(engine.scheduler, "schedule", broken_once)
        with pytest.raises(RequestFailed):
            await async_engine.complete("def f():", SamplingParams(max_new_tokens=4))
        out = await async_engine.complete("def add(a, b):", INNOCENT)  # the loop still runs
        await async_engine.close()
        return out

    out = asyncio.run(run())
    assert out.text == innocent_text and not engine.has_unfinished()


def test_stop_string_hold_back_matches_its_definition():
    """The held-back tail is the longest end of the pending text that is a proper prefix of a stop string."""
    import random

    from minicoder.engine.detokenizer import StopStringFilter

    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        f = StopStringFilter(stops)
        f.pending = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 8)))
        expected = max((k for s in stops for k in range(1, min(len(s) - 1, len(f.pending)) + 1)
                        if f.pending.endswith(s[:k])), default=0)
        assert f._longest_stop_prefix_suffix() == expected, (stops, f.pending)


def test_a_seeded_request_keeps_its_text_when_a_neighbour_fails_in_sampling(engine):
    seeded = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=5)
    [alone] = engine.run_to_completion(["def add(a, b):"], seeded)
    innocent = engine.submit("def add(a, b):", seeded)
    victim = engine.submit("def f():", SamplingParams(max_new_tokens=8, logprobs=2, temperature=1.0, seed=1))
    engine.step()
    engine.requests[victim].params.logprobs = 10**6  # raises after every row has drawn its token
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[victim].finish_reason == "error"
    assert outputs[innocent].text == alone.text
