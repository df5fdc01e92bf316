"""Quantized model directories: writing and reading them.

int4 (AWQ or round-to-nearest) is stored as AutoAWQ's "GEMM" checkpoints are, the format transformers,
vLLM, SGLang, TGI and LMDeploy read: per quantized Linear `qweight` (in, out/8) int32, `qzeros`
(in/group, out/8) int32, eight 4-bit values per int32 in the order 0 2 4 6 1 3 5 7, `scales` (in/group, out)
float16; the other tensors in float16; `config.json` gets

    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                            "version": "gemm", "modules_to_not_convert": null}

AWQ's activation scales are already folded into the preceding RMSNorm / Linear weights, so nothing else is
needed to run it. int8 has no such common convention for weight-only per-channel int8; minicoder writes
`qweight` (out, in) int8 and `scales` (out,) float32 under `"quant_method": "minicoder"`, which other
engines refuse rather than misread (export GGUF q8_0 for them). How a model was quantized (method,
calibration data, errors, time) goes to `quantization.json` beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import MinicoderError
from .apply import install, linear_names
from .rtn import Int4Weight, Int8Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # position i of an int32 holds column AWQ_ORDER[i] of 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json", "minicoder.json")
SUMMARY_FILE = "quantization.json"


def quantization_config(bits: int, group_size: int | None, skipped: list[str]) -> dict:
    if bits == 4:
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": skipped or None}
    return {"quant_method": "minicoder", "bits": 8, "format": "int8-per-channel",
            "modules_to_not_convert": skipped or None}


# --- AWQ int32 packing -----------------------------------------------------------------------------

def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers 0..15 -> (rows, cols / 8) int32 in AWQ's order."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    packed = (v << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # as two's-complement int32
    return packed.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    rows, cols8 = packed.shape
    v = (packed.to(torch.int64)[..., None] >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    return v[..., list(AWQ_REVERSE_ORDER)].reshape(rows, cols8 * 8).to(torch.uint8)


def int4_tensors(name: str, w: Int4Weight) -> dict[str, torch.Tensor]:
    return {f"{name}.qweight": pack_awq(w.codes.t()), f"{name}.qzeros": pack_awq(w.zeros.t()),
            f"{name}.scales": w.scales.t().contiguous().half()}


def int4_from_tensors(name: str, state: dict, group_size: int) -> Int4Weight:
    codes = unpack_awq(state.pop(f"{name}.qweight")).t().contiguous()
    zeros = unpack_awq(state.pop(f"{name}.qzeros")).t().contiguous()
    scales = state.pop(f"{name}.scales").t().contiguous().half()
    return Int4Weight(codes, scales, zeros, group_size)


# --- writing ---------------------------------------------------------------------------------------

def save_quantized(model, weights: dict[str, Int4Weight | Int8Weight], source_dir: Path, out: Path,
                   hf_config: dict, qconfig: dict, summary: dict) -> None:
    """Write a quantized model directory into `out` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if module in weights or (k == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        state[k] = v.detach().half().contiguous()
    for name, w in weights.items():
        if isinstance(w, Int4Weight):
            state.update(int4_tensors(name, w))
        else:
            state[f"{name}.qweight"] = w.codes.contiguous()
            state[f"{name}.scales"] = w.scales.float().contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = {**hf_config, "torch_dtype": "float16", "quantization_config": qconfig}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


# --- reading ---------------------------------------------------------------------------------------

def read_quantization_config(hf_config: dict, file: Path) -> tuple[int, int | None, set[str]] | None:
    """(bits, group_size, modules kept in float) of a quantized checkpoint, None for a float one."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method, bits = q.get("quant_method"), q.get("bits")
    skipped = set(q.get("modules_to_not_convert") or ())
    if method == "awq" and bits == 4 and q.get("zero_point", True) and q.get("version", "gemm").lower() == "gemm":
        return 4, int(q["group_size"]), skipped
    if method == "minicoder" and bits == 8:
        return 8, None, skipped
    raise MinicoderError(f"{file}: quantization_config {json.dumps(q)[:160]} is not one minicoder reads "
                         "(AWQ 4-bit GEMM with zero points, or minicoder int8)")


def is_skipped(name: str, skipped: set[str]) -> bool:
    """HF's rule: a module is kept in float when any entry of modules_to_not_convert is part of its name."""
    return any(s in name for s in skipped)


def load_quantized_weights(model, state: dict, bits: int, group_size: int | None, skipped: set[str],
                           dtype: torch.dtype) -> None:
    """Install the quantized layers whose tensors are in `state` (removing those tensors from it)."""
    weights = {}
    for name in linear_names(model):
        if is_skipped(name, skipped):
            continue
        if f"{name}.qweight" not in state:
            raise MinicoderError(f"quantized weights of {name} are missing")
        if bits == 4:
            weights[name] = int4_from_tensors(name, state, group_size)
        else:
            weights[name] = Int8Weight(state.pop(f"{name}.qweight"), state.pop(f"{name}.scales").float())
    install(model, weights, dtype)
