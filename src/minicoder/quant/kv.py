"""KV-cache quantization: int8 / int4 keys and values, per token and per head, asymmetric (LMDeploy's
`--quant-policy 8|4`).

Each head's vector of a token is stored as codes (uint8; two int4 codes per byte) plus a float16 scale and
zero: x ~= code * scale + zero. Quantizing on write and dequantizing on read is all the engine does; the
model's `kv_cache_dtype` hook applies the same round trip, so a held-out loss measures exactly what serving
computes.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4")
_LEVELS = {"int8": 255, "int4": 15}


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, float_dtype: torch.dtype,
                       kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's keys and values take in the cache, over all layers."""
    if kv_cache_dtype == "auto":
        per_head = head_dim * float_dtype.itemsize
    else:  # codes + float16 scale and zero
        per_head = head_dim * (8 if kv_cache_dtype == "int8" else 4) // 8 + 4
    return 2 * num_layers * kv_heads * per_head


def code_width(head_dim: int, kv_cache_dtype: str) -> int:
    return head_dim if kv_cache_dtype == "int8" else head_dim // 2


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> codes (..., code_width) uint8 and scale/zero (..., 2) float16."""
    levels = _LEVELS[kv_cache_dtype]
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=1e-6).half()
    zero = lo.half()
    codes = torch.round((xf - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    if kv_cache_dtype == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.cat([scale, zero], -1)


def dequantize(codes: torch.Tensor, meta: torch.Tensor, kv_cache_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    if kv_cache_dtype == "int4":
        codes = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2)
    meta = meta.to(dtype)
    return codes.to(dtype) * meta[..., :1] + meta[..., 1:]


def round_trip(x: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """What reading back a cached x gives."""
    if kv_cache_dtype == "auto":
        return x
    return dequantize(*quantize(x, kv_cache_dtype), kv_cache_dtype, x.dtype)


def check_kv_cache_dtype(value: str, head_dim: int | None = None) -> None:
    from ..errors import MinicoderError

    if value not in KV_CACHE_DTYPES:
        raise MinicoderError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")
    if value == "int4" and head_dim is not None and head_dim % 2:
        raise MinicoderError(f"--kv-cache-dtype int4 needs an even head_dim, the model's is {head_dim}")
