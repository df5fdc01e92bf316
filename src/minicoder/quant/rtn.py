"""Round-to-nearest weight quantization: the number formats every method here ends in.

- int8: per output channel, symmetric (codes -127..127, one scale per row), what `torch._weight_int8pack_mm` takes.
- int4: group-wise along the input dimension, asymmetric with an integer zero point (codes 0..15, one scale and
  one zero per `group_size` inputs of a row), the AWQ / GPTQ layout: w = (code - zero) * scale.

AWQ (awq.py) only changes what is rounded (scaled and clipped weights); the rounding is this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MinicoderError

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts


@dataclass
class Int4Weight:
    """Codes (out, in) uint8 in 0..15, scales and integer zeros (out, in // group_size)."""

    codes: torch.Tensor
    scales: torch.Tensor  # float16: stored as AWQ stores them, so files and memory hold the same numbers
    zeros: torch.Tensor  # uint8 in 0..15
    group_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.codes.view(n, k // self.group_size, self.group_size).to(dtype)
        w = (g - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.view(n, k)


@dataclass
class Int8Weight:
    codes: torch.Tensor  # (out, in) int8 in -127..127
    scales: torch.Tensor  # (out,) float32

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.codes.to(dtype) * self.scales.to(dtype)[:, None]


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise MinicoderError(f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                             f"(the int4 kernel's), got {group_size}")
    if in_features % group_size:
        raise MinicoderError(f"--group-size {group_size} does not divide the width {in_features} of {name}")


def int4_group_size_for(in_features: int, preferred: int = 128) -> int | None:
    """The largest kernel group size <= preferred that divides `in_features` (None: int4 cannot hold it)."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= preferred and in_features % g == 0:
            return g
    return None


def int4_range(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of a (out, in) matrix, each (out, in // group_size); 0 is always inside the range."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)
    return g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)


def quantize_int4(w: torch.Tensor, group_size: int = 128, w_min: torch.Tensor | None = None,
                  w_max: torch.Tensor | None = None) -> Int4Weight:
    """Asymmetric group-wise int4; `w_min`/`w_max` (per group) override the range, which is how clipping works."""
    n, k = w.shape
    lo, hi = int4_range(w, group_size)
    lo = lo if w_min is None else w_min
    hi = hi if w_max is None else w_max
    scales = ((hi - lo) / 15).clamp(min=1e-8).half()  # rounded to fp16 first: codes are computed against it
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    g = w.float().view(n, k // group_size, group_size)
    codes = (torch.round(g / s[..., None]) + zeros[..., None]).clamp(0, 15)
    return Int4Weight(codes.to(torch.uint8).view(n, k), scales, zeros.to(torch.uint8), group_size)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    scales = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-8)
    codes = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scales)


def fake_quantize_int4(w: torch.Tensor, group_size: int, w_min=None, w_max=None) -> torch.Tensor:
    """Quantize and dequantize: what the model computes with, for searches that compare outputs."""
    return quantize_int4(w, group_size, w_min, w_max).dequantize(w.dtype)
