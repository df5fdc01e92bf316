"""Loading a model directory for the engine: its tokenizer, its weights on the runner that fits them (minicoder's
paged Llama runner, or transformers for other architectures), the dtype `--dtype auto` resolves to, compression
applied on load, the decode step compiled (or why not), and the ids that end a generation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MinicoderError

log = logging.getLogger("minicoder.engine")

NATIVE_MODEL_TYPES = ("llama", "mistral")
# End-of-turn tokens of known chat formats: generation stops on them as on end-of-sequence.
END_OF_TURN_TOKENS = ("<|EOT|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise MinicoderError(f"{path}: invalid JSON ({e})") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise MinicoderError(f"{path}: model directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MinicoderError(f"{path}: cannot load a tokenizer ({e})") from None


@dataclass
class _LoadedModel:
    backend: str
    runner: object  # PagedLlamaRunner or TransformersRunner: forward(chunks) -> logits, release(request_id)
    max_model_len: int
    vocab_size: int
    num_blocks: int
    kv_bytes_per_token: int = 0
    dtype: torch.dtype = torch.float32
    dtype_reason: str = "as configured"


def load_model(path: Path, config) -> _LoadedModel:
    from ..model import LlamaForCausalLM, UnsupportedModel
    from .hf_backend import TransformersRunner, load_transformers_model
    from .runner import PagedLlamaRunner, kv_bytes_per_token

    hf_config = _read_json(path / "config.json")
    if not hf_config:
        raise MinicoderError(f"{path}: not a model directory (no config.json)")
    from .options import resolve_dtype

    try:
        dtype, dtype_reason = resolve_dtype(config.dtype)
    except AttributeError:
        raise MinicoderError(f"dtype {config.dtype!r}: not a torch dtype (auto, float32, bfloat16, float16)") from None
    max_len = min(config.max_model_len or 1 << 30, hf_config.get("max_position_embeddings", 4096))
    blocks_for_all = config.max_num_seqs * -(-max_len // config.block_size)
    native_error = None
    compressed = config.quantize or config.kv_cache_dtype != "auto" or hf_config.get("quantization_config")
    if config.backend in ("auto", "native") and hf_config.get("model_type") in NATIVE_MODEL_TYPES:
        try:
            model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
        except UnsupportedModel as e:  # e.g. RoPE scaling: transformers runs it
            native_error = MinicoderError(str(e))
        else:
            compress_on_load(model, config)
            per_token = kv_bytes_per_token(model.config, dtype, config.kv_cache_dtype)
            num_blocks = config.num_blocks or max(1, min(blocks_for_all, config.kv_cache_bytes // (per_token * config.block_size)))
            runner = PagedLlamaRunner(model, num_blocks, config.block_size, config.kv_cache_dtype)
            return _LoadedModel("native", runner, max_len, model.config.vocab_size, num_blocks, per_token, dtype,
                                dtype_reason)
    if compressed:  # quantized weights and KV cache exist in the native runner only
        raise native_error or MinicoderError(f"{path}: quantization (--quantize, --kv-cache-dtype, quantized "
                                             "checkpoints) needs the native backend (a Llama-family model)")
    if config.backend == "native":
        model_type = hf_config.get("model_type")
        raise native_error or MinicoderError(f"{path}: model_type {model_type!r} needs the transformers backend")
    model = load_transformers_model(path, dtype)
    return _LoadedModel("transformers", TransformersRunner(model), max_len, model.config.vocab_size,
                        config.num_blocks or blocks_for_all, dtype=dtype, dtype_reason=dtype_reason)


def compile_decode(runner, backend: str, mode: str) -> str:
    """Compile the native runner's decode step per `mode` (auto/on/off); returns what the step runs as."""
    from .compiled_decode import CompileUnavailable

    if mode not in ("auto", "on", "off"):
        raise MinicoderError(f"compile {mode!r}: expected auto, on or off")
    if mode == "off":
        return "eager (--compile off)"
    reason = "the transformers backend runs eagerly" if backend != "native" else runner.compile_reason()
    if reason and mode == "auto":  # a configuration that has no compiled path: nothing failed, no notice
        return f"eager ({reason})"
    try:
        if reason:
            raise CompileUnavailable(reason)
        seconds = runner.compile_decode()
    except CompileUnavailable as e:
        if mode == "on":
            raise MinicoderError(f"--compile on: the decode step cannot be compiled ({e})") from None
        log.warning("torch.compile is unavailable (%s): decoding eagerly", e)
        return f"eager (compile unavailable: {e})"
    return f"compiled (torch.compile, warmed up in {seconds:.1f} s)"


def compress_on_load(model, config) -> None:
    """Apply `quantize` (round-to-nearest weights) and check `kv_cache_dtype` before the runner is built."""
    from ..quant.kv import check_kv_cache_dtype

    check_kv_cache_dtype(config.kv_cache_dtype, model.config.head_dim)
    if config.quantize:
        from ..quant.apply import quantize_model

        quantize_model(model, config.quantize)


def eos_token_ids(path: Path, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json and the tokenizer, plus known end-of-turn tokens."""
    configured = _read_json(path / "generation_config.json").get("eos_token_id")
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
