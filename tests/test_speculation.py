"""Prompt-lookup speculative decoding: the same greedy tokens and logprobs as plain decoding, the same
sampling distribution (and seeded text) for sampled requests, fewer steps on edit-style prompts, and
counters that say how many drafts were accepted."""

from __future__ import annotations

import pytest

from minicoder.engine import Engine, EngineConfig, GuidedDecoding, SamplingParams
from minicoder.engine.speculation import SpeculativeConfig, accept_greedy, accept_sampled, propose_ngram

from conftest import SAMPLE_CODE, save_peaked_llama

pytestmark = pytest.mark.usefixtures("one_thread")

FUNCTION = SAMPLE_CODE.split("\n\n\nclass")[0].strip()
EDIT_PROMPT = f"# Rewrite this function with a docstring.\n{FUNCTION}\n\n# Rewritten:\n{FUNCTION[:40]}"
NORMAL_PROMPTS = ["def", "import os\n", "class Greeter:\n    def __init__(self"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    return save_peaked_llama(tmp_path_factory.mktemp("peaked"))


def engine(model_dir, k: int | None = None, **config) -> Engine:
    speculative = None if k is None else SpeculativeConfig(num_speculative_tokens=k)
    return Engine(model_dir, EngineConfig(speculative=speculative, **config))


def run(model_dir, prompts, params, k=None, **config):
    e = engine(model_dir, k, **config)
    steps = 0
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [e.submit(p, q) for p, q in zip(prompts, params)]
    final = {}
    while e.has_unfinished():
        steps += 1
        for out in e.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids], steps, e


def assert_same(plain, speculative):
    for a, b in zip(plain, speculative):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        if a.logprobs is not None:
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < TOLERANCE
                assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_propose_ngram_takes_the_most_recent_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert propose_ngram(tokens, 1, 3, 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert propose_ngram(tokens, 3, 3, 3) == []  # "5 2 3" never occurred before
    assert propose_ngram([4, 4, 4], 1, 2, 5) == [4]  # continuation stops at the end of the text
    assert propose_ngram([1, 2], 1, 2, 0) == []


def test_propose_ngram_equals_a_brute_force_search():
    import random

    def brute_force(tokens, min_n, max_n, k):
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            for i in range(len(tokens) - 1 - n, -1, -1):  # most recent first
                if tokens[i : i + n] == tokens[len(tokens) - n :]:
                    return tokens[i + n : i + n + k]
        return []

    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randint(0, 3) for _ in range(rng.randint(0, 30))]
        min_n = rng.randint(1, 3)
        max_n, k = rng.randint(min_n, 5), rng.randint(1, 5)
        assert propose_ngram(tokens, min_n, max_n, k) == brute_force(tokens, min_n, max_n, k), (tokens, min_n, max_n)


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_models_token():
    import torch

    logits = torch.full((4, 10), -5.0)
    for row, target in enumerate([3, 4, 6, 8]):
        logits[row, target] = 5.0
    assert accept_greedy(logits, [3, 4, 5]) == ([3, 4, 6], 2)
    assert accept_greedy(logits, [3, 4, 6]) == ([3, 4, 6, 8], 3)  # all accepted: the bonus token too
    assert accept_greedy(logits, [0, 4, 6]) == ([3], 0)


@pytest.mark.parametrize("k", [1, 8])
def test_edit_prompt_same_tokens_and_logprobs_in_fewer_steps(peaked_dir, k):
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, logprobs=3)
    plain, plain_steps, _ = run(peaked_dir, [EDIT_PROMPT], params)
    spec, spec_steps, e = run(peaked_dir, [EDIT_PROMPT], params, k=k)
    assert_same(plain, spec)
    stats = e.stats().speculation
    assert stats.draft_tokens > 0 and 0 < stats.accepted_tokens <= stats.draft_tokens
    assert spec[0].draft_tokens == stats.draft_tokens and spec[0].accepted_draft_tokens == stats.accepted_tokens
    assert spec_steps == plain_steps - stats.accepted_tokens  # every accepted draft saved one step
    assert e.kv.num_free_blocks == len(e.kv.blocks)  # rejected drafts' blocks came back


def test_normal_prompts_alone_same_tokens(peaked_dir):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=2)
    for prompt in NORMAL_PROMPTS[:2]:
        plain, _, _ = run(peaked_dir, [prompt], params)
        spec, _, _ = run(peaked_dir, [prompt], params, k=5)
        assert_same(plain, spec)


def test_batch_mixes_speculating_sampled_and_prefilling_requests(peaked_dir):
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=7)
    penalized = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=8, presence_penalty=0.5)
    prompts = [EDIT_PROMPT, *NORMAL_PROMPTS, EDIT_PROMPT + "\n"]
    params = [greedy, greedy, penalized, greedy, sampled]
    config = {"max_num_batched_tokens": 24}  # long prompts prefill in chunks beside the speculating decodes
    plain, _, _ = run(peaked_dir, prompts, params, **config)
    spec, _, e = run(peaked_dir, prompts, params, k=4, **config)
    assert_same(plain, spec)  # sampled requests too: one draw per emitted token, so a seed gives the same text
    assert spec[4].draft_tokens > 0 and spec[2].draft_tokens == 0 and e.stats().speculation.accepted_tokens > 0


def test_accept_sampled_is_rejection_sampling_with_a_one_hot_draft():
    import torch

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    draft, n = [1, 2], 6000
    results = [accept_sampled(probs, draft, torch.Generator().manual_seed(seed)) for seed in range(n)]
    # Draft 1 at position 0 is accepted with probability p0(1) = 0.3, then draft 2 with p1(2) = 0.3.
    accepted = [a for _, a in results]
    assert abs(accepted.count(0) / n - 0.7) < 0.03 and abs(accepted.count(2) / n - 0.09) < 0.015
    rejected_first = [tokens[0] for tokens, a in results if a == 0]  # p0 without draft 1: 5/7, 2/7, 0, 0
    assert 1 not in rejected_first and 3 not in rejected_first
    assert abs(rejected_first.count(0) / len(rejected_first) - 5 / 7) < 0.03
    assert all(len(tokens) == a + 1 and tokens[:a] == draft[:a] for tokens, a in results)
    # Each emitted token is one draw: the tokens are what plain sampling row by row gives for the same seed.
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        tokens, _ = accept_sampled(probs, draft, torch.Generator().manual_seed(seed))
        assert tokens == [int(torch.multinomial(probs[i], 1, generator=generator)) for i in range(len(tokens))]


def two_sample_chi_square(a: list, b: list, min_count: int = 10) -> tuple[float, int]:
    """Chi-square homogeneity statistic of two equal-size samples, categories seen fewer than `min_count`
    times in both together pooled into one; returns (statistic, degrees of freedom)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    bins, pooled = [], [0, 0]
    for key in ca.keys() | cb.keys():
        if ca[key] + cb[key] >= min_count:
            bins.append((ca[key], cb[key]))
        else:
            pooled[0] += ca[key]
            pooled[1] += cb[key]
    if sum(pooled):
        bins.append(tuple(pooled))
    return sum((x - y) ** 2 / (x + y) for x, y in bins), len(bins) - 1


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z: the normal one), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampled_speculation_keeps_the_sampling_distribution(peaked_dir):
    """Many seeded requests sampling on from a prompt that ends in the model's own repetition loop (so most
    steps have drafts): the first tokens are distributed the same with and without speculation (different
    seeds each side: this tests the distribution, not the seed). Accepting drafts the sampler would not
    have drawn shifts the mass to the loop and fails it."""
    n, new_tokens = 160, 4
    e = engine(peaked_dir)
    [loop] = e.run_to_completion([EDIT_PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True))
    prompt = e.prompts.completion(EDIT_PROMPT) + loop.token_ids

    def outputs(k, seeds):
        params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=1.2, top_k=20, top_p=0.95,
                                 min_p=0.01, seed=s) for s in seeds]
        result, _, e = run(peaked_dir, [prompt] * n, params, k=k, max_num_seqs=256, max_num_batched_tokens=4096)
        return [tuple(o.token_ids) for o in result], e

    plain, _ = outputs(None, range(n))
    spec, e = outputs(4, range(n, 2 * n))
    statistic, df = two_sample_chi_square(plain, spec)
    assert df >= 3 and statistic < chi_square_critical(df), (statistic, df)
    stats = e.stats().speculation
    assert stats.draft_tokens > n and 0 < stats.accepted_tokens < stats.draft_tokens  # drafts kept and refused


def test_penalized_and_guided_requests_do_not_speculate(peaked_dir):
    guided = GuidedDecoding(lark=r'start: /[ -~\n]+/')  # any printable text: copying the prompt is allowed
    cases = [SamplingParams(max_new_tokens=24, ignore_eos=True, repetition_penalty=1.2),
             SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.8, seed=3, frequency_penalty=0.3),
             SamplingParams(max_new_tokens=24, ignore_eos=True, guided=guided)]
    plain, _, _ = run(peaked_dir, [EDIT_PROMPT] * len(cases), cases)
    spec, _, e = run(peaked_dir, [EDIT_PROMPT] * len(cases), cases, k=5)
    assert_same(plain, spec)
    assert [o.draft_tokens for o in spec] == [0, 0, 0] and e.stats().speculation.draft_tokens == 0


def test_stop_strings_and_max_tokens_end_mid_draft(peaked_dir):
    [reference], _, _ = run(peaked_dir, [EDIT_PROMPT], SamplingParams(max_new_tokens=40, ignore_eos=True))
    stop = reference.text[12:16]
    for params in (SamplingParams(max_new_tokens=40, ignore_eos=True, stop=[stop]),
                   SamplingParams(max_new_tokens=7, ignore_eos=True)):
        plain, _, _ = run(peaked_dir, [EDIT_PROMPT], params)
        spec, _, e = run(peaked_dir, [EDIT_PROMPT], params, k=8)
        assert_same(plain, spec)
        assert e.kv.num_free_blocks == len(e.kv.blocks)
    assert len(spec[0].token_ids) == 7 and spec[0].finish_reason == "length"


def test_preemption_and_prefix_cache_with_speculation(peaked_dir):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = [EDIT_PROMPT, EDIT_PROMPT + "\n", NORMAL_PROMPTS[2], EDIT_PROMPT[:90]]
    plain, _, _ = run(peaked_dir, prompts, params, num_blocks=12, max_num_batched_tokens=64)
    spec, _, e = run(peaked_dir, prompts, params, k=5, num_blocks=12, max_num_batched_tokens=64)
    assert e.stats().preemptions > 0 and e.stats().prefix_cache.hit_tokens > 0
    assert_same(plain, spec)
    assert e.stats().speculation.accepted_tokens > 0


def test_speculative_config_is_validated(peaked_dir):
    for bad in ({"num_speculative_tokens": 0}, {"prompt_lookup_min": 3, "prompt_lookup_max": 2},
                {"method": "eagle"}):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("method", "speculative method")):
            Engine(peaked_dir, EngineConfig(speculative=SpeculativeConfig(**bad)))


def test_generate_and_serve_flags(peaked_dir, capsys):
    from minicoder.cli import main

    args = ["generate", str(peaked_dir), "--prompt", EDIT_PROMPT, "--max-new-tokens", "24"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "ngram", "--num-speculative-tokens", "3", "--prompt-lookup-max", "3"]) == 0
    assert capsys.readouterr().out == plain
    for bad, message in ((["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative ngram"),
                         (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens must"),
                         (["--speculative", "ngram", "--prompt-lookup-min", "5"], "--prompt-lookup-min (5)")):
        assert main([*args, *bad]) == 2
        assert f"error: {message}" in capsys.readouterr().err

    [expected], _, _ = run(peaked_dir, [EDIT_PROMPT], SamplingParams(max_new_tokens=24, ignore_eos=True))
    # A tiny temperature is greedy: it speculates too.
    assert served_texts_counting_drafts(peaked_dir, [{"temperature": 0}, {"temperature": 1e-7}]) == [expected.text] * 2


def test_sampled_requests_speculate_over_http_and_count_in_metrics(peaked_dir):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.7, seed=11)
    [expected], _, _ = run(peaked_dir, [EDIT_PROMPT], params)  # without speculation
    assert served_texts_counting_drafts(peaked_dir, [{"temperature": 0.7, "seed": 11}]) == [expected.text]


def served_texts_counting_drafts(peaked_dir, bodies: list[dict]) -> list[str]:
    """The texts a server speculating with K=5 answers EDIT_PROMPT completions with (24 tokens, `bodies`
    added); its /metrics must count the drafts of them all, as the engine does, and some must be accepted."""
    from fastapi.testclient import TestClient

    from minicoder.engine import AsyncEngine
    from minicoder.server import ServerSettings, create_app

    app = create_app(AsyncEngine(engine(peaked_dir, k=5)), ServerSettings(model_name="m"))
    with TestClient(app) as client:
        texts = [client.post("/v1/completions", json={"prompt": EDIT_PROMPT, "max_tokens": 24, "ignore_eos": True,
                                                      **body}).json()["choices"][0]["text"] for body in bodies]
        metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                   for line in client.get("/metrics").text.splitlines() if not line.startswith("#")}
    stats = app.state.server.engine.engine.stats().speculation
    assert metrics["minicoder_spec_decode_num_draft_tokens_total"] == stats.draft_tokens > 0
    assert metrics["minicoder_spec_decode_num_accepted_tokens_total"] == stats.accepted_tokens > 0
    assert metrics["minicoder_spec_decode_request_acceptance_rate_count"] == len(bodies)
    return texts


def test_min_tokens_mask_follows_each_draft_position(peaked_dir):
    """Stop tokens are held back per draft position: row i of a verified chunk comes after i more tokens."""
    import torch

    from minicoder.engine.speculation import verify

    e = engine(peaked_dir, k=3)
    stop, choices = 107, [103, 104, 105, 106]  # the choices are no end-of-sequence token either
    assert stop not in e.eos_token_ids and not set(choices) & e.eos_token_ids
    for params in (SamplingParams(min_new_tokens=2, stop_token_ids=[stop]),
                   SamplingParams(min_new_tokens=2, stop_token_ids=[stop], temperature=0.5, top_k=2, seed=0)):
        request = e.requests[e.submit("def", params)]
        logits = torch.zeros(4, e.vocab_size)
        logits[:, stop] = 50.0  # the model's choice everywhere
        logits[[0, 1, 2, 3], choices] = 40.0  # each row's choice without it
        # Rows 0 and 1 (0 and 1 tokens generated before them) may not stop; row 2 (2 generated) may.
        assert verify(logits, [103, 104, stop], request) == ([103, 104, stop, stop], 3)
        assert verify(logits, [103, 104, 105], request) == ([103, 104, stop], 2)
        assert verify(logits, [103, stop, 105], request) == ([103, 104], 1)
