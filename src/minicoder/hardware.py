"""What this CPU runs fast, detected at run time (machines differ: some have AVX-512 BF16 or AMX, some not)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware; without them PyTorch emulates bf16, slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def fast_bf16_features() -> list[str]:
    """The bf16 instructions this CPU has, by name, for start-up lines ("AVX-512 BF16", "AMX")."""
    found = [name for name, probe in (("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported),
                                      ("AMX", getattr(torch.cpu, "_is_amx_tile_supported", lambda: False))) if probe()]
    return found
