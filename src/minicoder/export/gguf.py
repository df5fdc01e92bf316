"""GGUF export: a minicoder (or Hugging Face Llama) model directory -> one `.gguf` file for llama.cpp / Ollama.

What llama.cpp's own `convert_hf_to_gguf.py` does for a Llama with a byte-level BPE tokenizer, without its
pre-tokenizer hash lookup (which refuses tokenizers it has not seen): architecture `llama` metadata, weights
under llama.cpp's tensor names with Q/K rows permuted to GGML's rotary layout, and the tokenizer (tokens,
merges, special ids, FIM and end-of-turn ids, chat template) declared as the `gpt-2` pre-tokenizer, whose
split regex is the one minicoder's tokenizer uses.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import MinicoderError

if TYPE_CHECKING:  # torch loads only when a model is exported, not for every `minicoder` command
    from ..model import LlamaForCausalLM, ModelConfig
from ..tokenizer import EOT

# --type -> (file type recorded in the header, storage type of the 2-D weights)
TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
         "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0")}
# Types whose mixes (per-tensor type choices, k-quant search) only llama.cpp's own quantizer makes: an f32
# GGUF is written, then `llama_model_quantize` (llama-cpp-python) turns it into this type.
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
ALL_TYPES = [*TYPES, *LLAMA_CPP_TYPES]

# End-of-turn spellings of known chat formats (minicoder/DeepSeek-Coder, Llama 3, ChatML, Gemma).
EOT_TOKENS = (EOT, "<|eot_id|>", "<|im_end|>", "<end_of_turn>")

# Hugging Face parameter name (after `model.`) -> llama.cpp tensor name; {i} is the layer.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MinicoderError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


# --- weights --------------------------------------------------------------------------------------

def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from Hugging Face's rotate_half layout (each head: all first halves, then all second halves)
    to GGML's interleaved pairs; `LlamaModel.permute` of llama.cpp's converter."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_rotary` (GGML layout back to Hugging Face's)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every weight, Q/K permuted; no `output` when it is tied to the embedding."""
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf_name, name in LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            if name == "attn_q":
                w = permute_rotary(w, config.num_attention_heads)
            elif name == "attn_k":
                w = permute_rotary(w, config.num_key_value_heads)
            tensors.append((f"blk.{i}.{name}.weight", w))
    tensors.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:  # llama.cpp falls back to token_embd when `output` is absent
        tensors.append(("output.weight", state["lm_head.weight"]))
    return tensors


def storage_type(name: str, array: np.ndarray, weight_type):
    """Norms and other 1-D tensors stay f32, as llama.cpp keeps them; matrices take the chosen type."""
    gguf = _gguf()
    if array.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return weight_type


def encode_tensor(array: np.ndarray, qtype):
    """The bytes of one tensor in `qtype`; rows that do not split into Q8_0/Q4_0 blocks of 32 fall back to f16,
    as in the converter."""
    gguf = _gguf()
    try:
        return gguf.quants.quantize(np.ascontiguousarray(array), qtype), qtype
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(np.ascontiguousarray(array), qtype), qtype


# --- tokenizer -------------------------------------------------------------------------------------

@dataclass
class Vocab:
    tokens: list[str]  # in id order, padded with [PADn] to the model's vocab size
    token_types: list[int]
    merges: list[str]  # "left right", as llama.cpp reads them
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    fim_ids: tuple[int, int, int] | None  # prefix, suffix, middle
    eot_id: int | None
    chat_template: str | list | None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinicoderError(f"{path}: invalid JSON ({e})") from None


def check_byte_level_bpe(spec: dict, file: Path) -> None:
    """Only tokenizers that llama.cpp's `gpt-2` pre-tokenizer reproduces exactly: byte-level BPE, GPT-2's
    split regex, no normalizer. Anything else would load but tokenize differently, so refuse it."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise MinicoderError(f"{file}: tokenizer model {model.get('type')!r} is not supported yet "
                             "(GGUF export handles byte-level BPE only)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise MinicoderError(f"{file}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} is not supported yet "
                             "(GGUF export handles GPT-2's ByteLevel split only)")
    if spec.get("normalizer") or model.get("ignore_merges") or model.get("byte_fallback"):
        raise MinicoderError(f"{file}: normalizer / ignore_merges / byte_fallback are not supported yet by GGUF export")


def _merge_strings(merges: list) -> list[str]:
    # tokenizers >= 0.20 stores pairs; llama.cpp reads "left right" with a literal space written as U+0120.
    if merges and isinstance(merges[0], str):
        return merges
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]


def _token_id(tok, value) -> int | None:
    """Id of a token given as tokenizer_config.json writes it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def token_table(tok, vocab_size: int, file: Path) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types, padded with unused [PADn] rows up to the model's vocab size."""
    token_type = _gguf().TokenType
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise MinicoderError(f"{file}: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(token_type.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(token_type.NORMAL if i not in added else
                         token_type.CONTROL if added[i].special else token_type.USER_DEFINED)
    return tokens, types


def read_vocab(model_dir: Path, vocab_size: int, hf_config: dict) -> Vocab:
    from tokenizers import Tokenizer as HFTokenizer

    from ..engine.prompts import find_fim_format

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise MinicoderError(f"{model_dir}: no tokenizer.json (GGUF export needs a Hugging Face fast tokenizer)")
    spec = _read_json(file)
    check_byte_level_bpe(spec, file)
    tok = HFTokenizer.from_file(str(file))
    config_file = model_dir / "tokenizer_config.json"
    tok_config = _read_json(config_file) if config_file.is_file() else {}
    tokens, types = token_table(tok, vocab_size, file)

    bos_id = _token_id(tok, tok_config.get("bos_token"))
    bos_id = hf_config.get("bos_token_id") if bos_id is None else bos_id
    eos_id = _token_id(tok, tok_config.get("eos_token"))
    eos_id = hf_config.get("eos_token_id") if eos_id is None else eos_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # no setting: ask the tokenizer whether its post-processor puts BOS first
        add_bos = bos_id is not None and tok.encode("a").ids[:1] == [bos_id]

    vocab = tok.get_vocab(with_added_tokens=True)
    fim = find_fim_format(vocab)
    template = tok_config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():  # newer transformers write it apart
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return Vocab(
        tokens=tokens,
        token_types=types,
        merges=_merge_strings(spec["model"].get("merges", [])),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=_token_id(tok, tok_config.get("pad_token")),
        add_bos=bool(add_bos),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        fim_ids=(vocab[fim.prefix], vocab[fim.suffix], vocab[fim.middle]) if fim else None,
        eot_id=next((vocab[t] for t in EOT_TOKENS if t in vocab), None),
        chat_template=template,
    )


# --- writing ---------------------------------------------------------------------------------------

def write_hparams(writer, config: ModelConfig, name: str, file_type) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.rope_linear_factor != 1.0:  # as llama.cpp's converter writes DeepSeek-Coder's linear scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_linear_factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_vocab(writer, vocab: Vocab) -> None:
    keys = _gguf().Keys.Tokenizer
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, the one ByteLevel(use_regex=True) applies
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for add, token_id in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_pad_token_id, vocab.pad_id), (writer.add_eot_token_id, vocab.eot_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.fim_ids is not None:  # gguf 0.19's writer has no helpers for these keys
        for key, token_id in zip((keys.FIM_PRE_ID, keys.FIM_SUF_ID, keys.FIM_MID_ID), vocab.fim_ids):
            writer.add_uint32(key, token_id)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def load_model(model_dir: Path) -> LlamaForCausalLM:
    """The model in fp32; a quantized one (AWQ, int8) has its codes dequantized, AWQ's scales being already
    folded into its weights and norms, so llama.cpp runs it as a plain Llama."""
    if not model_dir.is_dir():
        raise MinicoderError(f"{model_dir}: no such model directory")
    from ..model import LlamaForCausalLM
    from ..quant.apply import dequantize_model

    model = LlamaForCausalLM.from_pretrained(model_dir)  # raises MinicoderError on bad files
    dequantize_model(model)
    return model


def llama_cpp_quantize(src: Path, dst: Path, type: str) -> None:
    """llama.cpp's quantizer (through llama-cpp-python) from an f32 GGUF to `type`."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise MinicoderError(f"--type {type} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[type])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise MinicoderError(f"llama.cpp could not quantize {src} to {type}")


def export_gguf(model_dir: str | Path, out_file: str | Path, type: str = "f16") -> dict:
    """Write `model_dir` as one GGUF file (atomically: a temporary file renamed into place). Returns a summary."""
    if type not in ALL_TYPES:
        raise MinicoderError(f"unknown GGUF type {type!r}; choose one of {', '.join(ALL_TYPES)}")
    gguf = _gguf()
    model_dir, out_file = Path(model_dir), Path(out_file)
    model = load_model(model_dir)
    if type in LLAMA_CPP_TYPES:
        return _export_through_llama_cpp(model_dir, out_file, type, model)
    return _write_gguf(model_dir, out_file, type, model)


def _export_through_llama_cpp(model_dir: Path, out_file: Path, type: str, model) -> dict:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    f32 = out_file.with_name(f".{out_file.name}.{os.getpid()}.f32")
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        summary = _write_gguf(model_dir, f32, "f32", model)
        llama_cpp_quantize(f32, tmp, type)
        os.replace(tmp, out_file)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return {**summary, "path": str(out_file), "type": type, "bytes": out_file.stat().st_size}


def _write_gguf(model_dir: Path, out_file: Path, type: str, model) -> dict:
    gguf = _gguf()
    vocab = read_vocab(model_dir, model.config.vocab_size, _read_json(model_dir / "config.json"))
    file_type = gguf.LlamaFileType[TYPES[type][0]]
    weight_type = gguf.GGMLQuantizationType[TYPES[type][1]]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        write_hparams(writer, model.config, model_dir.resolve().name, file_type)
        write_vocab(writer, vocab)
        tensors = gguf_tensors(model)
        for name, array in tensors:
            data, qtype = encode_tensor(array, storage_type(name, array, weight_type))
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_file), "type": type, "tensors": len(tensors), "bytes": out_file.stat().st_size,
            "vocab_size": len(vocab.tokens), "tied_embeddings": model.config.tie_word_embeddings}


# --- CLI: minicoder export gguf MODEL --out FILE.gguf --type f16 -------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `minicoder export gguf`."""
    parser.add_argument("model", type=Path, metavar="MODEL", help="model directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.gguf", help="output GGUF file")
    parser.add_argument("--type", default="f16", choices=ALL_TYPES,
                        help="storage type of the weight matrices; norms stay f32 (default f16); "
                             "q4_k_m uses llama.cpp's quantizer (llama-cpp-python)")


def run(args: argparse.Namespace) -> None:
    s = export_gguf(args.model, args.out, type=args.type)
    print(f"gguf: {s['tensors']} tensors, {s['type']}, vocab {s['vocab_size']}, {s['bytes'] / 1e6:.1f} MB -> {s['path']}")
