"""The decode step's fast paths: in-place paged attention, the torch.compile'd step (same logits as the eager
runner for single requests, batches, chunked prefill, preemption and prefix-cache hits), the fallback when
compilation fails, and `--dtype auto` following the CPU."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from minicoder import hardware
from minicoder.engine import Engine, EngineConfig, SamplingParams
from minicoder.engine.paged_attention import decode_attention
from minicoder.errors import MinicoderError

from conftest import SAMPLE_CODE, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["def", SAMPLE_CODE[:200], "class Greeter:\n    def __init__(self", SAMPLE_CODE[:90] + "\n# 你好\n",
           "for i in range(3):\n    print(i, fibonacci(i))\n" * 2]
# Small enough a pool that four requests preempt each other, chunked prefill, a prefix cache.
CONFIG = dict(num_blocks=10, block_size=16, max_num_seqs=4, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


# --- paged attention read in place -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_in_place_equals_gather_and_sdpa(dtype, tol):
    torch.manual_seed(0)
    B, H, KV, hd, bs, blocks = 3, 4, 2, 16, 4, 12
    k_cache, v_cache = torch.randn(blocks, bs, KV, hd).to(dtype), torch.randn(blocks, bs, KV, hd).to(dtype)
    tables = torch.tensor([[7, 2, 9], [4, 0, 0], [11, 5, 1]])  # scattered blocks; row 1 padded
    cached = torch.tensor([9, 3, 12])  # 12: every slot of row 2's blocks
    q, k_new, v_new = (torch.randn(B, n, hd).to(dtype) for n in (H, KV, KV))
    out = decode_attention(q, k_new, v_new, k_cache, v_cache, tables, cached)
    for b in range(B):  # reference: gather this request's tokens, append the new one, SDPA
        n = int(cached[b])
        keys = torch.cat([k_cache[tables[b]].reshape(-1, KV, hd)[:n], k_new[b : b + 1]]).float()
        values = torch.cat([v_cache[tables[b]].reshape(-1, KV, hd)[:n], v_new[b : b + 1]]).float()
        ref = F.scaled_dot_product_attention(q[b].float()[None, :, None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], enable_gqa=True)
        torch.testing.assert_close(out[b].float(), ref.reshape(-1), atol=tol, rtol=tol)


# --- compilation: fallback and the dtype line --------------------------------------------------------
def failing_compile(*args, **kwargs):
    def compiled(*a, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")  # what inductor raises without g++
    return compiled


def test_compile_auto_falls_back_to_eager_with_a_notice(llama_dir, monkeypatch, caplog):
    eager = Engine(llama_dir, EngineConfig(compile="off"))
    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level(logging.WARNING, logger="minicoder.engine"):
        engine = Engine(llama_dir, EngineConfig(compile="auto"))
    notices = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(notices) == 1 and "No working C++ compiler" in notices[0] and "decoding eagerly" in notices[0]
    assert engine.runner.compiled is None and "eager (compile unavailable" in engine.runtime_summary()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in engine.run_to_completion(PROMPTS[:2], params)] == \
        [o.token_ids for o in eager.run_to_completion(PROMPTS[:2], params)]


def test_compile_on_fails_cleanly_when_it_cannot(llama_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(MinicoderError, match="--compile on: the decode step cannot be compiled"):
        Engine(llama_dir, EngineConfig(compile="on"))
    with pytest.raises(MinicoderError, match="--kv-cache-dtype int8 runs eagerly"):
        Engine(llama_dir, EngineConfig(compile="on", kv_cache_dtype="int8"))


def test_compile_auto_without_a_compiled_path_is_quietly_eager(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", failing_compile)  # never reached: nothing to compile
    with caplog.at_level(logging.WARNING, logger="minicoder.engine"):
        engine = Engine(llama_dir, EngineConfig(compile="auto", kv_cache_dtype="int8"))
    assert engine.runtime_summary().endswith("decode: eager (--kv-cache-dtype int8 runs eagerly)")
    assert not caplog.records


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_dtype_auto_follows_the_cpu(llama_dir, monkeypatch, fast_bf16):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(hardware, "fast_bf16_features", lambda: ["AVX-512 BF16", "AMX"] if fast_bf16 else [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = Engine(llama_dir, EngineConfig(dtype="auto"))
    assert engine.runner.lm_head.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    expected = "dtype: bf16 (AVX-512 BF16 + AMX detected)" if fast_bf16 else "dtype: fp32 (this CPU has no AVX-512 BF16"
    assert engine.runtime_summary().startswith(expected)
    [out] = engine.run_to_completion(["def"], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_generate_cli_prints_dtype_and_decode_mode(llama_dir, monkeypatch, capsys):
    from minicoder.cli import main

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(llama_dir), "--prompt", "def", "--max-new-tokens", "3", "--compile", "off"]) == 0
    err = capsys.readouterr().err
    assert "dtype: fp32 (this CPU has no AVX-512 BF16 or AMX" in err and "decode: eager (--compile off)" in err
    assert main(["generate", str(llama_dir), "--prompt", "def", "--dtype", "bf16", "--compile", "off"]) == 0
    assert "dtype: bf16 (as configured)" in capsys.readouterr().err


# --- the compiled step equals the eager one ------------------------------------------------------------
def recorded_logits(engine: Engine) -> list[torch.Tensor]:
    seen = []
    forward = engine.runner.forward

    def recording(chunks):
        logits = forward(chunks)
        seen.append(logits.float().clone())
        return logits
    engine.runner.forward = recording
    return seen


@pytest.fixture(scope="module")
def compiled_pair(llama_dir):
    """(eager, compiled) engines of one config; compiling takes tens of seconds to minutes on a busy CPU."""
    return Engine(llama_dir, EngineConfig(compile="off", **CONFIG)), Engine(llama_dir, EngineConfig(compile="on", **CONFIG))


def run_both(pair, prompts, params):
    eager, compiled = pair
    calls = compiled.runner.compiled.calls
    seen = [recorded_logits(e) for e in pair]
    outs = [e.run_to_completion(prompts, params) for e in pair]
    assert len(seen[0]) == len(seen[1])  # the same steps, the same chunks
    for step, (a, b) in enumerate(zip(*seen)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert compiled.runner.compiled.calls > calls and compiled.runner.compiled.eager_steps == 0
    assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]
    return outs


@pytest.mark.slow
def test_compiled_decode_equals_eager_single_request_and_batch(compiled_pair):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    run_both(compiled_pair, PROMPTS[:1], params)
    run_both(compiled_pair, PROMPTS[:3], params)  # batched decodes beside chunked prefills (48 tokens a step)


@pytest.mark.slow
def test_a_step_that_would_recompile_runs_eagerly(compiled_pair):
    runner = compiled_pair[1].runner
    ids, positions, tables = torch.tensor([3], dtype=torch.int32), torch.tensor([4]), torch.tensor([[0, 1]])
    with torch.inference_mode():
        assert runner.compiled(ids, positions, tables) is None  # int32 ids: a new graph, not compiled while serving
    assert runner.compiled.eager_steps == 1
    runner.compiled.eager_steps = 0


@pytest.mark.slow
def test_compiled_decode_equals_eager_with_preemption_and_prefix_hits(compiled_pair):
    run_both(compiled_pair, PROMPTS[1:5], SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert all(e.stats().preemptions > 0 for e in compiled_pair)
    outs = run_both(compiled_pair, [PROMPTS[1]] * 2, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert outs[1][0].cached_tokens > 0 or outs[1][1].cached_tokens > 0


@pytest.mark.slow
def test_compiled_decode_bf16_close_to_eager_bf16(llama_dir):
    # bf16 rounds differently where inductor fuses (fp32 inside a fused kernel vs a bf16 tensor between eager ops):
    # logits agree to about 2 bf16 ulps of their magnitude, so the bound is 5e-2, not fp32's 1e-4.
    pair = [Engine(llama_dir, EngineConfig(dtype="bf16", compile=mode, **CONFIG)) for mode in ("off", "on")]
    seen = [recorded_logits(e) for e in pair]
    for e in pair:
        e.run_to_completion(PROMPTS[:2], SamplingParams(max_new_tokens=8, ignore_eos=True))
    for a, b in zip(*seen):
        torch.testing.assert_close(b, a, atol=5e-2, rtol=5e-2)
        if not torch.equal(a.argmax(-1), b.argmax(-1)):  # a near tie went the other way: later inputs differ
            break
    assert pair[1].runner.compiled.calls > 0
