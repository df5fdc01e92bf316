"""What this CPU runs fast, detected at run time (machines differ: some have AVX-512 BF16 or AMX, some not)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware; without them PyTorch emulates bf16, slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
