"""The engine's logprobs against transformers' on a model with confident predictions.

Comparing token ids alone on a nearly uniform random model lets cache bugs through (a wrong KV slot
moves its logits too little to change an argmax). Here every generated token's logprob and its top-5
are compared with `AutoModelForCausalLM` run on prompt + output, within a float32 tolerance, for each
path a token's keys and values can take: one request, a batch of different lengths, chunked prefill,
a prefix-cache hit and recompute after preemption.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from minicoder.engine import Engine, EngineConfig, SamplingParams

from conftest import SAMPLE_CODE, save_peaked_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4  # float32 logprobs: the engine's fused/paged kernels against transformers' eager ones
TOP = 5

PROMPTS = [
    "def",
    SAMPLE_CODE[:200],
    "import os\n",
    "for i in range(3):\n    print(i, fibonacci(i))\n" * 3,
    "class Greeter:\n    def __init__(self",
]


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    return save_peaked_llama(tmp_path_factory.mktemp("peaked"))


@pytest.fixture(scope="module")
def hf_model(peaked_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(peaked_dir).eval()


def reference_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each position that predicted an output token: (len(output_ids), vocab)."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt_ids) - 1 : -1].log_softmax(-1)


def assert_matches_transformers(model, engine: Engine, prompt: str, out):
    """Each generated token is transformers' argmax, with its logprob and top-5 within TOLERANCE."""
    prompt_ids = engine.tokenizer.encode(prompt)
    assert out.finish_reason in ("stop", "length") and len(out.logprobs) == len(out.token_ids) > 0
    expected = reference_logprobs(model, prompt_ids, out.token_ids)
    for i, (token, got) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[i]
        assert token == int(row.argmax()), f"{prompt!r}: token {i} is {token}, transformers' argmax {int(row.argmax())}"
        assert got.token_id == token
        assert abs(got.logprob - float(row[token])) < TOLERANCE, (prompt, i, got.logprob, float(row[token]))
        values, ids = row.topk(TOP)
        assert [t for t, _ in got.top] == ids.tolist(), (prompt, i)
        assert max(abs(lp - float(v)) for (_, lp), v in zip(got.top, values)) < TOLERANCE, (prompt, i)


def params(max_new_tokens: int = 16) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, logprobs=TOP, ignore_eos=True)


def test_model_is_peaked(peaked_dir, hf_model):
    """The premise of this file: the model is confident, so a cache bug cannot hide in a flat distribution."""
    engine = Engine(peaked_dir)
    ids = engine.tokenizer.encode(SAMPLE_CODE[:200])
    probs = reference_logprobs(hf_model, ids[:-20], ids[-20:]).exp()
    assert probs.max(-1).values.median() > 0.5


def test_single_request(peaked_dir, hf_model):
    engine = Engine(peaked_dir)
    [out] = engine.run_to_completion([PROMPTS[1]], params(24))
    assert_matches_transformers(hf_model, engine, PROMPTS[1], out)


def test_batch_of_different_lengths(peaked_dir, hf_model):
    engine = Engine(peaked_dir, EngineConfig(enable_prefix_caching=False))
    outs = engine.run_to_completion(PROMPTS, [params(8 + 4 * i) for i in range(len(PROMPTS))])
    for prompt, out in zip(PROMPTS, outs):
        assert_matches_transformers(hf_model, engine, prompt, out)


def test_chunked_prefill(peaked_dir, hf_model):
    engine = Engine(peaked_dir, EngineConfig(max_num_batched_tokens=16, enable_prefix_caching=False))
    assert len(engine.tokenizer.encode(PROMPTS[3])) > 3 * 16  # prefilled over several steps, beside decodes
    outs = engine.run_to_completion(PROMPTS[:4], params(12))
    for prompt, out in zip(PROMPTS, outs):
        assert_matches_transformers(hf_model, engine, prompt, out)


def test_prefix_cache_hit(peaked_dir, hf_model):
    engine = Engine(peaked_dir)
    engine.run_to_completion([PROMPTS[3]], params(4))
    longer = PROMPTS[3] + "print('done')\n"  # shares the cached blocks, then goes on
    [out] = engine.run_to_completion([longer], params(16))
    assert out.cached_tokens >= 32
    assert_matches_transformers(hf_model, engine, longer, out)


def test_preemption(peaked_dir, hf_model):
    # 6 blocks of 16 tokens cannot hold four ~30-token sequences: the newest are preempted and recomputed.
    engine = Engine(peaked_dir, EngineConfig(num_blocks=6, max_num_batched_tokens=64))
    prompts = [PROMPTS[i] for i in (0, 2, 4, 1)][:3] + ["x = [i * i for i in range(10)]\n"]
    outs = engine.run_to_completion(prompts, params(20))
    assert engine.stats().preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_matches_transformers(hf_model, engine, prompt, out)
