"""Putting quantized layers into a model: which Linears are quantized, swapping them in, reading the result.

Every Linear of the decoder layers is quantized (q/k/v/o, gate/up/down); the embedding and `lm_head` stay
in floating point, as in AWQ, GPTQ and LMDeploy (the output layer is the most sensitive one, and here it is
also the tied embedding).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import MinicoderError
from .linear import Int4Linear, Int8Linear, QuantLinear, kernel_dtype
from .rtn import Int4Weight, Int8Weight, int4_group_size_for, quantize_int4, quantize_int8

log = logging.getLogger("minicoder.quant")

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ON_LOAD_METHODS = ("int8", "int4")


def linear_names(model) -> list[str]:
    """Full module names of the quantizable Linears, in order: model.layers.{i}.self_attn.q_proj, ..."""
    return [f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers) for name in LAYER_LINEARS]


def is_quantized(model) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def install(model, weights: dict[str, Int4Weight | Int8Weight], dtype: torch.dtype | None = None) -> None:
    """Replace the named Linears by quantized layers holding `weights`."""
    dtype = kernel_dtype(dtype or model.lm_head.weight.dtype)
    for name, w in weights.items():
        layer = Int4Linear(w, dtype) if isinstance(w, Int4Weight) else Int8Linear(w, dtype)
        set_module(model, name, layer)


def quantize_model(model, method: str, group_size: int = 128, progress: bool = False) -> dict:
    """Round-to-nearest `int8` or `int4` of every decoder Linear, in place (`--quantize` at load time).

    int4 takes the largest kernel group size <= `group_size` that divides a layer's width; a layer no group
    size divides (fewer than 32 inputs, or e.g. 688) stays int8, as llama.cpp falls back per tensor.
    Returns a summary: the format of each kind of layer.
    """
    if method not in ON_LOAD_METHODS:
        raise MinicoderError(f"--quantize must be one of {', '.join(ON_LOAD_METHODS)}, got {method!r}")
    if is_quantized(model):
        raise MinicoderError("the model is already quantized; --quantize applies to floating-point models only")
    formats: dict[str, str] = {}
    weights = {}
    for name in tqdm(linear_names(model), desc=f"quantize {method}", unit="layer", disable=not progress):
        w = model.get_submodule(name).weight.detach()
        group = int4_group_size_for(w.shape[1], group_size) if method == "int4" else None
        weights[name] = quantize_int4(w, group) if group else quantize_int8(w)
        kind = name.rsplit(".", 1)[1]
        formats[kind] = f"int4 g{group}" if group else "int8"
    install(model, weights)
    fallback = sorted(k for k, f in formats.items() if method == "int4" and f == "int8")
    if fallback:
        log.warning("int4: %s stay int8 (no group size of 32/64/128/256 divides their width)", ", ".join(fallback))
    return formats


def weight_bytes(model) -> int:
    """Bytes the model's weights take in memory, each tensor counted once (tied or fused ones too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def dequantize_model(model) -> None:
    """Turn quantized layers back into nn.Linear holding their dequantized weights (for export), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=False)
            lin.weight = nn.Parameter(module.dequantize().to(model.lm_head.weight.dtype), requires_grad=False)
            set_module(model, name, lin)
