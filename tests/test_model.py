"""The model is stock Llama: saved checkpoints load in transformers with equal logits and equal greedy output."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minicoder.engine.single_user import SingleUserEngine
from minicoder.engine.sampling_params import SamplingParams
from minicoder.model import KVCache, LlamaForCausalLM, ModelConfig
from minicoder.tokenizer import Tokenizer

from conftest import run_cli


def test_checkpoint_logits_equal_transformers(tiny_trained):
    final = tiny_trained / "final"
    ours = LlamaForCausalLM.from_pretrained(final)
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_linear_rope_scaling_equals_transformers(tmp_path):
    """DeepSeek-Coder 1.3B/6.7B checkpoints carry `rope_scaling: {type: linear, factor: 4}` (transformers 4.x spelling)."""
    import json

    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    HFLlama(config).save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())
    spec.pop("rope_parameters")
    spec.update(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=10000.0)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    theirs = HFLlama.from_pretrained(tmp_path).eval()
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_linear_factor == 4.0
    ids = torch.randint(0, 300, (1, 120))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    ours.save_pretrained(tmp_path / "again")  # and it round-trips through minicoder's own config.json
    again = HFLlama.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (ours(ids) - again(ids).logits).abs().max().item() < 1e-4


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 30)
        parts = [model(ids[:, :17], cache=cache, start=0)] + [model(ids[:, t : t + 1], cache=cache, start=t) for t in range(17, 30)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_greedy_generate_equals_transformers(tiny_trained):
    final = tiny_trained / "final"
    gen = SingleUserEngine(final)
    hf_tok = AutoTokenizer.from_pretrained(final)
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    stop = sorted(gen.engine.eos_token_ids)
    for prompt in ["def hello_world():", "import os\nclass ", "    for i in range("]:
        prompt_ids = gen.prompt_ids(prompt)
        assert prompt_ids == hf_tok(prompt)["input_ids"]  # same tokens, BOS included
        ours = list(gen.stream_token_ids(prompt_ids, SamplingParams(max_new_tokens=24, temperature=0)))
        out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24, eos_token_id=stop, pad_token_id=stop[0])
        theirs = [t for t in out[0, len(prompt_ids):].tolist() if t not in stop]
        assert ours == theirs


def test_generate_cli_prints_only_the_completion(tiny_trained):
    final = tiny_trained / "final"
    proc = run_cli("generate", str(final), "--prompt", "def add(a, b):", "--max-new-tokens", "12", check=True)
    expected = SingleUserEngine(final).complete("def add(a, b):", params=SamplingParams(max_new_tokens=12))
    assert proc.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "def add" not in proc.stdout[: len("def add")]


def test_generate_fim_uses_fim_tokens(tiny_trained):
    gen = SingleUserEngine(tiny_trained / "final")
    ids = gen.prompt_ids("def f(x):\n    ", suffix="\n    return y\n")
    tok = Tokenizer(tiny_trained / "final")
    assert ids == tok.fim_prompt("def f(x):\n    ", "\n    return y\n")
    assert ids[:2] == [tok.bos_id, tok.fim_begin_id] and ids[-1] == tok.fim_end_id and tok.fim_hole_id in ids
    proc = run_cli("generate", str(tiny_trained / "final"), "--prompt", "def f(x):\n    ", "--suffix", "\n    return y\n",
                   "--max-new-tokens", "8", check=True)
    assert proc.returncode == 0


def test_sampling_with_seed_is_reproducible(tiny_trained):
    gen = SingleUserEngine(tiny_trained / "final")
    params = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = gen.complete("def ", params=SamplingParams(**params))
    b = gen.complete("def ", params=SamplingParams(**params))
    assert a == b
