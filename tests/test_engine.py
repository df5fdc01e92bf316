"""The serving engine: parity with `transformers`, continuous batching, paged KV + prefix cache, sampling,
streaming, stop strings, cancellation, the transformers backend, prompt formats."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minicoder.engine import (AsyncEngine, Engine, EngineConfig, PromptBuilder, QueueFull, SamplingParams,
                              find_fim_format)
from minicoder.engine.detokenizer import IncrementalDetokenizer, StopStringFilter
from minicoder.engine.kv_cache import KVCacheManager
from minicoder.engine.request import Request
from minicoder.tokenizer import Tokenizer

from conftest import SAMPLE_CODE, save_tiny_llama, save_tiny_tokenizer

CODE = SAMPLE_CODE

PROMPTS = [
    "def",
    "import os\n",
    "class Greeter:\n    def __init__(self",
    CODE[:200],
    "x = [i * i for i in range(10)]\nprint(x)\n",
    CODE[:120] + "\n# 你好\n",
    "for i in range(3):\n    print(i, fibonacci(i))\n" * 3,
    "return",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def vocab_size(tokenizer_dir) -> int:
    return len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def make_engine(model_dir, **config) -> Engine:
    return Engine(model_dir, EngineConfig(**config))


def hf_greedy(model, engine: Engine, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(engine.eos_token_ids), pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


# --- parity with transformers --------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_greedy_single_request_matches_transformers(tied, llama_dir, hf_llama, tmp_path, tokenizer_dir):
    if tied:  # minicoder's own checkpoints tie the embeddings
        llama_dir = save_tiny_llama(tmp_path, tie_word_embeddings=True)
        hf_llama = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    engine = make_engine(llama_dir)
    [out] = engine.run_to_completion([PROMPTS[3]], SamplingParams(max_new_tokens=24))
    prompt_ids = engine.tokenizer.encode(PROMPTS[3])
    assert out.token_ids == hf_greedy(hf_llama, engine, prompt_ids, 24)
    assert out.prompt_tokens == len(prompt_ids) and out.completion_tokens == len(out.token_ids)
    assert out.finish_reason in ("stop", "length") and out.time_to_first_token > 0


def test_continuous_batching_with_chunked_prefill_matches_transformers(llama_dir, hf_llama):
    # A 16-token step budget: long prompts are prefilled over several steps while others decode, and
    # requests join the running batch as the budget allows and leave it when done.
    engine = make_engine(llama_dir, max_num_batched_tokens=16, enable_prefix_caching=False)
    lengths = [len(engine.tokenizer.encode(p)) for p in PROMPTS]
    assert max(lengths) > 3 * 16 and min(lengths) < 4
    max_new = [12 + 3 * i for i in range(len(PROMPTS))]
    ids = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, max_new)]
    streams: dict[str, list] = {}
    first_step: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
            first_step.setdefault(out.request_id, step)
    assert len(set(first_step.values())) > 3  # first tokens came at different steps
    for rid, prompt, n in zip(ids, PROMPTS, max_new):
        final = streams[rid][-1]
        assert final.finished
        assert final.token_ids == hf_greedy(hf_llama, engine, engine.tokenizer.encode(prompt), n), prompt
        assert [t for o in streams[rid] for t in o.delta_token_ids] == final.token_ids
        assert "".join(o.delta_text for o in streams[rid]) == final.text
    assert engine.kv.num_free_blocks == len(engine.kv.blocks)


def test_chunked_prefill_does_not_stall_decodes(llama_dir):
    engine = make_engine(llama_dir, max_num_batched_tokens=16)
    running = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    long_prompt = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=4, ignore_eos=True))
    steps = []
    while engine.requests.get(long_prompt):
        steps.append({o.request_id for o in engine.step()})
    prefill_steps = -(-len(engine.tokenizer.encode(PROMPTS[3])) // 15)  # the decode takes 1 token of each 16
    assert all(running in got for got in steps)  # one token every step
    assert long_prompt not in set().union(*steps[: prefill_steps - 1]) and long_prompt in steps[prefill_steps - 1]


def test_preemption_recomputes_and_keeps_outputs(llama_dir, hf_llama):
    # 6 blocks of 16 tokens cannot hold four 30-token sequences: the newest are preempted and recomputed.
    engine = make_engine(llama_dir, num_blocks=6, max_num_batched_tokens=64)
    prompts = [PROMPTS[i] for i in (2, 4, 5, 6)]
    outs = engine.run_to_completion(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert engine.stats().preemptions > 0
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_llama, engine, engine.tokenizer.encode(prompt), 20)
        assert out.token_ids[: len(expected)] == expected  # ignore_eos only differs after an EOS


# --- prefix cache ------------------------------------------------------------------------------------
def test_prefix_cache_hit_gives_same_output(llama_dir, hf_llama):
    engine = make_engine(llama_dir)
    params = SamplingParams(max_new_tokens=16)
    [miss] = engine.run_to_completion([PROMPTS[6]], params)
    assert miss.cached_tokens == 0
    [hit] = engine.run_to_completion([PROMPTS[6]], params)
    prompt_len = len(engine.tokenizer.encode(PROMPTS[6]))
    assert hit.cached_tokens == (prompt_len - 1) // 16 * 16 > 0
    assert hit.token_ids == miss.token_ids
    longer = PROMPTS[6] + "print('done')\n"  # shares the cached blocks, then goes on
    [partial] = engine.run_to_completion([longer], params)
    assert partial.cached_tokens >= hit.cached_tokens
    assert partial.token_ids == hf_greedy(hf_llama, engine, engine.tokenizer.encode(longer), 16)
    assert engine.stats().prefix_cache.hit_tokens == hit.cached_tokens + partial.cached_tokens


def test_prefix_cache_evicts_least_recently_used():
    kv = KVCacheManager(num_blocks=4, block_size=2)

    def request(tokens):
        return Request("r", tokens, SamplingParams(), tokenizer=None, vocab_size=16, eos_token_ids=set(),
                       max_total_tokens=100)

    def run(tokens) -> int:
        """Prefill and release a request; how many of its blocks came from the cache."""
        r = request(tokens)
        cached = kv.find_cached_prefix(r)
        r.num_computed_tokens = len(cached) * 2
        assert kv.allocate(r, len(tokens) - r.num_computed_tokens, cached)
        r.num_computed_tokens = len(tokens)
        kv.register_full_blocks(r)
        kv.free(r)
        return len(cached)

    def cached_blocks(tokens) -> int:
        return len(kv.find_cached_prefix(request(tokens)))

    assert run([1, 2, 9]) == 0 and run([3, 4, 9]) == 0  # caches blocks [1,2] and [3,4]
    assert run([1, 2, 7]) == 1  # a hit makes [1,2] the most recently used
    run([5, 6, 9])  # takes two free blocks: an uncached one, then the LRU cached one, [3,4]
    assert cached_blocks([1, 2, 0]) == 1 and cached_blocks([5, 6, 0]) == 1
    assert cached_blocks([3, 4, 0]) == 0


# --- sampling, stops, streaming ---------------------------------------------------------------------------
def test_same_seed_same_text_alone_and_in_batch(llama_dir):
    engine = make_engine(llama_dir)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=1234,
                            repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1, ignore_eos=True)
    [alone] = engine.run_to_completion([PROMPTS[1]], params)
    others = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i) for i in range(5)] + [SamplingParams()]
    batch = engine.run_to_completion([PROMPTS[1], *PROMPTS[2:8]], [params, *others])
    assert batch[0].token_ids == alone.token_ids and batch[0].text == alone.text
    [other_seed] = engine.run_to_completion([PROMPTS[1]], dataclasses.replace(params, seed=99))
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_across_tokens_is_not_leaked(llama_dir):
    engine = make_engine(llama_dir)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    outs = list(engine.stream(PROMPTS[0], params))
    full = outs[-1].text
    # A printable 3-character stop string that starts in one token's text and ends in the next one's.
    ends = [sum(len(o.delta_text) for o in outs[: i + 1]) for i in range(len(outs))]
    stop = next(full[b - 1 : b + 2] for a, b in zip([0, *ends], ends)
                if b > a and full[b - 1 : b + 2].isprintable() and len(full[b - 1 : b + 2]) == 3)
    stop_params = SamplingParams(max_new_tokens=40, ignore_eos=True, stop=["@@never", stop])
    stopped = list(engine.stream(PROMPTS[0], stop_params))
    final = stopped[-1]
    assert final.finish_reason == "stop" and final.text == full[: full.index(stop)]
    assert "".join(o.delta_text for o in stopped) == final.text  # nothing of the stop string was streamed


def test_stop_string_filter_holds_back_only_possible_stops():
    f = StopStringFilter(["</end>"])
    assert not f.add("code </") and f.release() == "code "  # "</" may start "</end>"
    assert not f.add("div>") and f.release() == "</div>"  # it did not
    assert f.add("x</en") is False and f.release() == "x"
    assert f.add("d> tail") and f.flush() == "" and f.text == "code </div>x"


def test_incremental_detokenizer_never_emits_broken_utf8(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "print('日本語 ñ 🎉')"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # unseen characters are split into bytes
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id])
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_stop_tokens_min_tokens_and_logprobs(llama_dir):
    engine = make_engine(llama_dir)
    [free] = engine.run_to_completion([PROMPTS[0]], SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3))
    first = free.token_ids[0]
    assert len(free.logprobs) == 6
    for lp, token in zip(free.logprobs, free.token_ids):
        assert lp.top[0][0] == token and len(lp.top) == 3 and lp.top[0][1] == lp.logprob <= 0
    [stopped] = engine.run_to_completion([PROMPTS[0]], SamplingParams(max_new_tokens=6, stop_token_ids=[first]))
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.text == ""
    [held] = engine.run_to_completion([PROMPTS[0]], SamplingParams(max_new_tokens=6, stop_token_ids=[first], min_new_tokens=3))
    assert first not in held.token_ids[:3]


# --- cancellation, queue bound, asyncio ------------------------------------------------------------------------
def test_a_tiny_temperature_is_greedy(llama_dir):
    """Dividing logits by 1e-7 would overflow: SamplingParams treats it as the argmax it tends to."""
    assert SamplingParams(temperature=1e-7).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    engine = make_engine(llama_dir)
    greedy, tiny = engine.run_to_completion([PROMPTS[3]] * 2, [SamplingParams(max_new_tokens=12, ignore_eos=True),
                                                               SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                                              temperature=1e-7, seed=None)])
    assert tiny.token_ids == greedy.token_ids


def test_cancel_frees_blocks_and_queue_bound(llama_dir):
    engine = make_engine(llama_dir, max_waiting=2, enable_prefix_caching=False)
    rid = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < len(engine.kv.blocks)
    engine.submit(PROMPTS[0])
    engine.submit(PROMPTS[1])
    with pytest.raises(QueueFull):
        engine.submit(PROMPTS[2])
    engine.cancel(rid)
    [final] = [o for o in engine.step() if o.request_id == rid]
    assert final.finished and final.finish_reason == "cancelled" and 0 < final.completion_tokens < 100
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.num_free_blocks == len(engine.kv.blocks) and not engine.has_unfinished()


def test_async_engine_streams_concurrently_and_cancels_on_disconnect(llama_dir):
    engine = AsyncEngine(make_engine(llama_dir))

    async def first_tokens(prompt, n):
        got = []
        stream = engine.stream(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
        async with contextlib.aclosing(stream):
            async for out in stream:
                got.append(out)
                if len(got) == n:
                    break  # the client goes away
        return got

    async def main():
        full, cut = await asyncio.gather(engine.complete(PROMPTS[1], SamplingParams(max_new_tokens=20)),
                                         first_tokens(PROMPTS[2], 3))
        for _ in range(200):  # the next step retires the cancelled request
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        await engine.close()
        return full, cut

    full, cut = asyncio.run(main())
    assert full.finished and len(cut) == 3
    assert not engine.engine.has_unfinished()
    assert engine.engine.kv.num_free_blocks == len(engine.engine.kv.blocks)


# --- the transformers backend ----------------------------------------------------------------------------
def test_transformers_backend_on_deepseek_v2(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(
        vocab_size=vocab_size(tokenizer_dir), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path)
    engine = make_engine(tmp_path, max_num_batched_tokens=16)
    assert engine.backend == "transformers"
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[4]]
    outs = engine.run_to_completion(prompts, SamplingParams(max_new_tokens=12))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(engine.runner.model, engine, engine.tokenizer.encode(prompt), 12)
    assert engine.kv.num_free_blocks == len(engine.kv.blocks)


# --- prompts -----------------------------------------------------------------------------------------------------
def test_fim_prompt_for_minicoder_matches_its_tokenizer(tokenizer_dir):
    prompts = PromptBuilder(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    assert prompts.fim_format.family == "deepseek-coder"
    prefix, suffix = "def add(a, b):\n    ", "\n    # <|EOT|> stays text\n"
    assert prompts.fim(prefix, suffix) == Tokenizer(tokenizer_dir).fim_prompt(prefix, suffix)


def test_fim_prompt_for_starcoder_token_spellings(tmp_path):
    specials = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CODE], trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompts = PromptBuilder(tokenizer)
    assert prompts.fim_format.family == "starcoder" and prompts.start_ids == []
    ids = prompts.fim("def f(", "):\n")
    vocab = tokenizer.get_vocab()
    assert ids[0] == vocab["<fim_prefix>"] and ids[-1] == vocab["<fim_middle>"]
    assert tokenizer.decode(ids) == "<fim_prefix>def f(<fim_suffix>):\n<fim_middle>"


def test_find_fim_format_by_family():
    def vocab(*tokens):
        return {t: i for i, t in enumerate(tokens)}

    deepseek = vocab("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
    assert find_fim_format(deepseek).family == "deepseek-coder"
    assert find_fim_format(vocab("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")).family == "qwen2.5-coder"
    assert find_fim_format(vocab("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")).family == "codellama"
    assert find_fim_format(vocab("<s>", "</s>")) is None


def test_chat_and_repository_prompts(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = PromptBuilder(tokenizer)
    chat = tokenizer.decode(prompts.chat([{"role": "user", "content": "Write hello world."}]))
    assert chat.startswith("<｜begin▁of▁sentence｜>")
    assert chat.endswith("### Instruction:\nWrite hello world.\n### Response:\n")
    files = [("utils.py", "def load():\n    pass\n"), ("model.py", "import utils\n")]
    repo = prompts.repository(files, "main.py", "from model import")
    text = tokenizer.decode(repo, skip_special_tokens=True)
    assert text == "# utils.py\ndef load():\n    pass\n\n# model.py\nimport utils\n\n# main.py\nfrom model import"
