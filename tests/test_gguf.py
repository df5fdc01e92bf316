"""GGUF export: metadata, tokenizer, tensor layout read back with gguf's reader; quantized types and quantized
models; and llama.cpp itself (llama-cpp-python, installed by `make install`): its tokenization and greedy
tokens equal minicoder's, and it runs every quantized type and an AWQ model exported with its scales folded."""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from minicoder.engine.single_user import SingleUserEngine  # noqa: E402
from minicoder.engine.sampling_params import SamplingParams  # noqa: E402
from minicoder.errors import MinicoderError  # noqa: E402
from minicoder.export.gguf import configure_parser, export_gguf, permute_rotary, run, unpermute_rotary  # noqa: E402
from minicoder.model import LlamaForCausalLM, ModelConfig, apply_rope, rope_tables  # noqa: E402
from minicoder.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, save_tokenizer, train_tokenizer  # noqa: E402

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Greeter:
    def greet(self, name: str = "wörld") -> str:
        return f"Hello, {name}! 你好 🙂 <|EOT|>"
'''

CONFIG = dict(vocab_size=416, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)


def make_model_dir(out: Path, tied: bool) -> Path:
    """A tiny random model with a tokenizer trained on some standard-library code (vocab 400, padded to 416 rows)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20000] for p in sorted(stdlib.glob("*.py"))[:30]]
    save_tokenizer(train_tokenizer(texts, vocab_size=400), out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**CONFIG, tie_word_embeddings=tied))
    # A larger init than training uses, so the logits of the next token differ by clear margins and greedy
    # decoding moves from token to token instead of repeating one (a meaningful llama.cpp comparison).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(std=0.25 if "embed" in name or "lm_head" in name else 0.12)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gguf") / "tied", tied=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gguf") / "untied", tied=False)


def read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor)."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def as_float(tensor) -> np.ndarray:
    """A stored tensor as fp32 in the original (rows, cols) shape, whatever its type."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    return {k: v.numpy() for k, v in model.state_dict().items()}


# --- metadata and tokenizer ----------------------------------------------------------------------

def test_llama_metadata(tied_dir, tmp_path):
    summary = export_gguf(tied_dir, tmp_path / "m.gguf", type="f16")
    meta, _ = read(tmp_path / "m.gguf")
    assert summary["type"] == "f16" and summary["vocab_size"] == 416 and summary["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert meta["general.architecture"] == "llama"
    expected = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 160,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
                "rope.dimension_count": 16, "vocab_size": 416}
    assert {k: meta[f"llama.{k}"] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_tokenizer_metadata(tied_dir, tmp_path):
    export_gguf(tied_dir, tmp_path / "m.gguf")
    meta, _ = read(tmp_path / "m.gguf")
    tok = Tokenizer(tied_dir)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 416  # padded to the embedding's rows
    assert tokens[:400] == [tok.tok.id_to_token(i) for i in range(400)]
    assert tokens[:7] == SPECIAL_TOKENS and tokens[400:] == [f"[PAD{i}]" for i in range(400, 416)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:7] == [gguf.TokenType.CONTROL] * 7 and set(types[7:400]) == {gguf.TokenType.NORMAL}
    assert set(types[400:]) == {gguf.TokenType.UNUSED}
    merges = json.loads((tied_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    ids = {k.removeprefix("tokenizer.ggml."): v for k, v in meta.items() if k.endswith("token_id")}
    assert ids == {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "padding_token_id": tok.pad_id,
                   "eot_token_id": tok.eot_id, "fim_pre_token_id": tok.fim_begin_id,
                   "fim_suf_token_id": tok.fim_hole_id, "fim_mid_token_id": tok.fim_end_id}
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE


# --- tensors -------------------------------------------------------------------------------------

def test_tensor_names_shapes_and_qk_permutation(tied_dir, tmp_path):
    export_gguf(tied_dir, tmp_path / "m.gguf", type="f32")
    _, tensors = read(tmp_path / "m.gguf")
    hf = hf_weights(tied_dir)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == names  # tied: no `output`, llama.cpp reuses token_embd
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    assert list(tensors["token_embd.weight"].shape) == [64, 416]  # GGML order: (columns, rows)
    np.testing.assert_array_equal(as_float(tensors["token_embd.weight"]), hf["model.embed_tokens.weight"])
    for i in range(2):
        q, k = as_float(tensors[f"blk.{i}.attn_q.weight"]), as_float(tensors[f"blk.{i}.attn_k.weight"])
        assert q.shape == (64, 64) and k.shape == (32, 64)
        assert not np.array_equal(q, hf[f"model.layers.{i}.self_attn.q_proj.weight"])  # really permuted
        np.testing.assert_array_equal(unpermute_rotary(q, 4), hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        np.testing.assert_array_equal(unpermute_rotary(k, 2), hf[f"model.layers.{i}.self_attn.k_proj.weight"])
        np.testing.assert_array_equal(as_float(tensors[f"blk.{i}.ffn_down.weight"]), hf[f"model.layers.{i}.mlp.down_proj.weight"])


def test_permutation_turns_rotate_half_into_interleaved_rope():
    """GGML's rope rotates adjacent pairs (x0, x1), (x2, x3), ...; on permuted rows it must give the permuted
    result of Hugging Face's rope on the original rows, so attention scores are unchanged."""
    cfg = ModelConfig(**CONFIG)
    n_heads, hd, T = 4, cfg.head_dim, 5
    w = torch.randn(n_heads * hd, 64)
    x = torch.randn(T, 64)
    cos, sin = rope_tables(cfg, torch.arange(T)[None])
    q_hf = apply_rope((x @ w.T).view(1, T, n_heads, hd).transpose(1, 2), cos, sin)  # (1, heads, T, hd)
    q = (x @ torch.from_numpy(permute_rotary(w.numpy(), n_heads)).T).view(T, n_heads, hd // 2, 2)
    angle = torch.arange(T)[:, None].float() * cfg.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    q_ggml = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1).view(T, n_heads * hd)
    expected = torch.from_numpy(permute_rotary(q_hf[0].transpose(0, 1).reshape(T, -1).T.numpy(), n_heads)).T
    torch.testing.assert_close(q_ggml, expected, atol=1e-5, rtol=1e-5)


def test_untied_model_writes_output(untied_dir, tmp_path):
    export_gguf(untied_dir, tmp_path / "m.gguf", type="f32")
    meta, tensors = read(tmp_path / "m.gguf")
    np.testing.assert_array_equal(as_float(tensors["output.weight"]), hf_weights(untied_dir)["lm_head.weight"])


@pytest.mark.parametrize("qtype, file_type, tolerance", [("f16", "MOSTLY_F16", 1e-3), ("bf16", "MOSTLY_BF16", 8e-3),
                                                         ("q8_0", "MOSTLY_Q8_0", None)])
def test_reduced_types_stay_close(tied_dir, tmp_path, qtype, file_type, tolerance):
    export_gguf(tied_dir, tmp_path / "m.gguf", type=qtype)
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType[file_type]
    hf = hf_weights(tied_dir)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    stored = tensors["blk.1.ffn_up.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType[qtype.upper()]
    original, restored = hf["model.layers.1.mlp.up_proj.weight"], as_float(stored)
    assert restored.shape == original.shape
    if tolerance is None:  # Q8_0: blocks of 32 scaled by absmax/127 (an f16 scale): error < 0.6 of a step
        step = np.abs(original.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(restored - original).reshape(-1, 32) <= 0.6 * step + 1e-7).all()
    else:
        np.testing.assert_allclose(restored, original, rtol=tolerance, atol=1e-6)


def test_q4_0_blocks_stay_within_half_a_step(tied_dir, tmp_path):
    export_gguf(tied_dir, tmp_path / "m.gguf", type="q4_0")
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    stored = tensors["blk.1.ffn_up.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q4_0
    original, restored = hf_weights(tied_dir)["model.layers.1.mlp.up_proj.weight"], as_float(stored)
    # blocks of 32, d = (the value of largest magnitude) / -8: half a step of error, a whole one where the
    # other sign's extreme is clipped to code 15
    step = np.abs(original.reshape(-1, 32)).max(axis=1, keepdims=True) / 8
    error = np.abs(restored - original).reshape(-1, 32) / step
    assert error.max() <= 1.01 and np.median(error) < 0.3
    q8 = export_gguf(tied_dir, tmp_path / "q8.gguf", type="q8_0")["bytes"]
    assert (tmp_path / "m.gguf").stat().st_size < 0.75 * q8


def quantize_dir(model_dir: Path, out: Path, *args: str) -> Path:
    from minicoder.cli import main

    assert main(["quantize", str(model_dir), *args, "--group-size", "32", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def calib_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib")
    (out / "docs").mkdir()
    (out / "meta.json").write_text("{}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = [json.dumps({"text": p.read_text(encoding="utf-8", errors="replace")[:4000]}) for p in sorted(stdlib.glob("*.py"))[30:50]]
    (out / "docs" / "shard-00000.jsonl").write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="module")
def awq_dir(tied_dir, calib_corpus, tmp_path_factory) -> Path:
    return quantize_dir(tied_dir, tmp_path_factory.mktemp("awq") / "awq", "--method", "awq", "--bits", "4",
                        "--calib", str(calib_corpus), "--calib-samples", "8", "--calib-seqlen", "64")


def test_quantized_model_exports_its_dequantized_weights(awq_dir, tmp_path):
    export_gguf(awq_dir, tmp_path / "m.gguf", type="f32")
    _, tensors = read(tmp_path / "m.gguf")
    model = LlamaForCausalLM.from_pretrained(awq_dir)
    up = model.model.layers[0].mlp.up_proj
    np.testing.assert_array_equal(as_float(tensors["blk.0.ffn_up.weight"]), up.dequantize().numpy())
    # AWQ's scales live in the norms now: the exported norm is the AWQ model's, not the original's
    np.testing.assert_array_equal(as_float(tensors["blk.0.ffn_norm.weight"]),
                                  model.model.layers[0].post_attention_layernorm.weight.detach().numpy())


def test_q8_0_is_about_half_of_f16(tied_dir, tmp_path):
    f16 = export_gguf(tied_dir, tmp_path / "a.gguf", type="f16")["bytes"]
    q8 = export_gguf(tied_dir, tmp_path / "b.gguf", type="q8_0")["bytes"]
    assert 0.45 < q8 / f16 < 0.65


# --- errors and the CLI entry ---------------------------------------------------------------------

def test_missing_or_invalid_model_dir_is_an_error(tmp_path):
    with pytest.raises(MinicoderError, match="no such model directory"):
        export_gguf(tmp_path / "nowhere", tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinicoderError, match="no config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*tmp"))


def test_unknown_type_is_an_error(tied_dir, tmp_path):
    with pytest.raises(MinicoderError, match="unknown GGUF type 'q4_k'.*f16"):
        export_gguf(tied_dir, tmp_path / "m.gguf", type="q4_k")


def test_non_byte_level_tokenizer_is_an_error_and_writes_nothing(tied_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    model_dir = tmp_path / "sp"
    model_dir.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (model_dir / f).write_bytes((tied_dir / f).read_bytes())
    HFTokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)).save(str(model_dir / "tokenizer.json"))
    with pytest.raises(MinicoderError, match="tokenizer model 'Unigram' is not supported yet"):
        export_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_write_leaves_no_file(tied_dir, tmp_path, monkeypatch):
    from minicoder.export import gguf as exporter

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "encode_tensor", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tied_dir, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_entry_points(tied_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    run(parser.parse_args([str(tied_dir), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]))
    assert "20 tensors, q8_0, vocab 416" in capsys.readouterr().out
    assert read(tmp_path / "m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(SystemExit):
        parser.parse_args([str(tied_dir), "--out", "x.gguf", "--type", "q3_k"])


# --- llama.cpp itself -------------------------------------------------------------------------------

PROMPTS = ["def fibonacci(n):", "import os\nclass ", "    for i in range(", CODE[:150]]
NEAR_TIE = 0.05  # logits this close may swap order under llama.cpp's f16 weights and f16 KV cache (max error seen: 0.016)


@pytest.fixture(scope="module")
def llama_f16(tied_dir, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("llama_cpp") / "m.gguf"
    export_gguf(tied_dir, path, type="f16")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=False, verbose=False)


def llama_cpp_greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    tokens = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token in stop_ids or len(tokens) == max_new_tokens:  # minicoder stops there too, without yielding it
            break
        tokens.append(token)
    return tokens


def top2_gap(model: LlamaForCausalLM, ids: list[int]) -> float:
    """How far minicoder's best next token is ahead of the second best."""
    with torch.no_grad():
        best, second = model(torch.tensor([ids]), last_only=True)[0, -1].topk(2).values.tolist()
    return best - second


def test_llama_cpp_tokenizes_like_minicoder(tied_dir, llama_f16):
    tok = Tokenizer(tied_dir)
    for text in [CODE, *PROMPTS, "x  =\t[1,2]  # émoji 🙂\n\n\n  'don't' 3.14159 ___init___ <｜fim▁hole｜>"]:
        assert llama_f16.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    assert llama_f16.tokenize(b"def", add_bos=True, special=False) == tok.encode("def", bos=True)
    assert llama_f16.detokenize(tok.encode(CODE)).decode() == CODE


def test_llama_cpp_greedy_equals_minicoder(tied_dir, llama_f16):
    """Greedy tokens are equal; a prompt may part ways only where minicoder's own top-2 logits nearly tie."""
    tok, gen, model = Tokenizer(tied_dir), SingleUserEngine(tied_dir), LlamaForCausalLM.from_pretrained(tied_dir)
    exact, distinct = 0, set()
    for prompt in PROMPTS:
        prompt_ids = tok.encode(prompt, bos=True)
        ours = list(gen.stream_token_ids(prompt_ids, SamplingParams(max_new_tokens=24)))
        theirs = llama_cpp_greedy(llama_f16, prompt_ids, 24, {tok.eos_id, tok.eot_id})
        step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if step is None:
            assert len(theirs) == len(ours), prompt
            exact += 1
        else:
            gap = top2_gap(model, prompt_ids + ours[:step])
            assert gap < NEAR_TIE, f"{prompt!r}: llama.cpp differs at step {step} where minicoder's top-2 gap is {gap:.3f}"
        distinct |= set(ours)
    assert exact >= len(PROMPTS) - 1
    assert len(distinct) > 10  # the model is not degenerate: the comparison means something


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits after `ids` (read from the context: `Llama.scores` keeps them only with
    logits_all, which this llama.cpp no longer supports)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    # llama.cpp 0.3.36's CPU weight repacking (extra buffer types) segfaults on quantized tensors on this
    # AVX-512/AMX machine; loading without it runs the plain q8_0/q4_0/k-quant kernels.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    llm.close()
    return logits


def minicoder_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(model_dir)(torch.tensor([ids]))[0, -1].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# this model's weights are large and outlier-free, int4's worst case (measured: q4_0 0.951, AWQ -> q4_0 0.956)
@pytest.mark.parametrize("qtype, min_cosine", [("q8_0", 0.999), ("q4_0", 0.93), ("q4_k_m", 0.93)])
def test_llama_cpp_runs_each_quantized_type(tied_dir, tmp_path, qtype, min_cosine):
    pytest.importorskip("llama_cpp")
    summary = export_gguf(tied_dir, tmp_path / "m.gguf", type=qtype)
    assert summary["type"] == qtype and not list(tmp_path.glob(".*"))  # no temporary file left behind
    ids = Tokenizer(tied_dir).encode(CODE[:200], bos=True)
    theirs, ours = llama_cpp_logits(tmp_path / "m.gguf", ids), minicoder_logits(tied_dir, ids)
    assert cosine(theirs, ours) > min_cosine
    if qtype == "q4_k_m":  # llama.cpp's own quantizer wrote it
        assert read(tmp_path / "m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_llama_cpp_runs_an_awq_model_with_its_scales_folded(awq_dir, tmp_path):
    """The AWQ checkpoint in an external engine: llama.cpp computes what minicoder's AWQ model computes."""
    pytest.importorskip("llama_cpp")
    export_gguf(awq_dir, tmp_path / "awq.gguf", type="f32")
    ids = Tokenizer(awq_dir).encode(CODE[:200], bos=True)
    theirs, ours = llama_cpp_logits(tmp_path / "awq.gguf", ids), minicoder_logits(awq_dir, ids)
    assert cosine(theirs, ours) > 0.9999 and int(theirs.argmax()) == int(ours.argmax())
    export_gguf(awq_dir, tmp_path / "awq_q4.gguf", type="q4_0")
    assert cosine(llama_cpp_logits(tmp_path / "awq_q4.gguf", ids), ours) > 0.93
