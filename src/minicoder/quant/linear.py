"""Quantized Linear layers that multiply on PyTorch's packed CPU kernels, never on dequantized weights.

- `Int8Linear`: `torch._weight_int8pack_mm(x, int8 (out, in), scales (out,))` (weight-only int8, W8A16);
- `Int4Linear`: `torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)` (W4A16, group-wise);
  the packed layout is this CPU's (it depends on the vector width), so it is built at load time from plain
  codes and never written to disk.

Both kernels take fp32, bf16 or fp16 activations; the kernel picks AVX-512 / AVX2 code at run time. Layers
that read the same input (q/k/v, gate/up) are fused into one kernel call by `fuse`, the way the float runner
fuses its matrices; the original layers then become slices of the fused one, so no weight is held twice.

Why these kernels and not torchao: torchao's CPU int4 weight-only layout (`Int4CPULayout`) wraps this same ATen
int4 kernel, so it would add a dependency for the same code path; its int8 path was not compared (timings on
this shared machine mean nothing; benchmarks/decode_bench.py measures ours against llama.cpp).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..hardware import cpu_has_fast_bf16
from .rtn import Int4Weight, Int8Weight


def kernel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the packed kernels run in. With fp32 activations PyTorch's int8 / int4 CPU kernels
    take a slow path: at batch 1, 2048x2048, on an AVX-512 BF16 / AMX Xeon, int8 1,406 us and int4 3,769 us in fp32
    against 208 us and 148 us in bf16 (an fp32 Linear: 389 us). So an fp32 model's quantized layers compute in
    bf16 where the CPU runs bf16 in hardware (outputs are cast back); elsewhere in the model's dtype."""
    if model_dtype == torch.float32 and cpu_has_fast_bf16():
        return torch.bfloat16
    return model_dtype


def kernels_available() -> dict[str, bool]:
    return {"int8": hasattr(torch, "_weight_int8pack_mm"),
            "int4": hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")}


class QuantLinear(nn.Module):
    """Common parts: shapes, the slice-of-a-fused-layer forward, and `fuse`."""

    bits: int

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._fused: tuple[QuantLinear, int, int] | None = None  # (fused layer, first row, end row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            fused, start, end = self._fused
            return fused(x)[..., start:end]
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]).to(self.dtype).contiguous())  # the kernels want x in the scales' dtype
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class Int8Linear(QuantLinear):
    bits = 8

    def __init__(self, weight: Int8Weight, dtype: torch.dtype = torch.float32):
        super().__init__(weight.codes.shape[1], weight.codes.shape[0])
        self.register_buffer("qweight", weight.codes.contiguous())
        self.register_buffer("scales", weight.scales.to(dtype))

    @property
    def dtype(self):
        return self.scales.dtype

    def _matmul(self, x2d):
        return torch._weight_int8pack_mm(x2d, self.qweight, self.scales)

    def to_weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scales.float())

    def dequantize(self) -> torch.Tensor:
        return self.to_weight().dequantize()


class Int4Linear(QuantLinear):
    bits = 4

    def __init__(self, weight: Int4Weight, dtype: torch.dtype = torch.float32):
        n, k = weight.codes.shape
        super().__init__(k, n)
        self.group_size = weight.group_size
        # The portable form (needed by `fuse`, saving and export) stays until `pack()` is called.
        self.weight_data: Int4Weight | None = weight
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 1))
        # tinygemm's convention: w = (code - 8) * scale + zero_f, so zero_f = (8 - zero) * scale
        scales = weight.scales.float()
        zero_f = (8 - weight.zeros.float()) * scales
        self.register_buffer("scale_and_zero", torch.stack([scales, zero_f], -1).transpose(0, 1).contiguous().to(dtype))

    @property
    def dtype(self):
        return self.scale_and_zero.dtype

    def _matmul(self, x2d):
        return torch._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group_size, self.scale_and_zero)

    def to_weight(self) -> Int4Weight:
        if self.weight_data is None:
            raise RuntimeError("this layer was packed for serving; its portable codes are gone")
        return self.weight_data

    def dequantize(self) -> torch.Tensor:
        return self.to_weight().dequantize()

    def pack(self):
        """Drop the portable codes (half the layer's memory) once nothing needs them."""
        self.weight_data = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _cat_weights(layers: list[QuantLinear]):
    if all(isinstance(m, Int8Linear) for m in layers):
        return Int8Linear(Int8Weight(torch.cat([m.qweight for m in layers]), torch.cat([m.scales.float() for m in layers])),
                          layers[0].dtype)
    if all(isinstance(m, Int4Linear) for m in layers) and len({m.group_size for m in layers}) == 1:
        ws = [m.to_weight() for m in layers]
        return Int4Linear(Int4Weight(torch.cat([w.codes for w in ws]), torch.cat([w.scales for w in ws]),
                                     torch.cat([w.zeros for w in ws]), ws[0].group_size), layers[0].dtype)
    return None


def fuse(layers: list[QuantLinear]) -> QuantLinear | None:
    """One layer computing all of `layers` (same input) in one kernel call; each of `layers` becomes a slice
    of it and gives up its own weights. None when the layers do not share a format."""
    fused = _cat_weights(layers)
    if fused is None:
        return None
    start = 0
    for m in layers:
        end = start + m.out_features
        for name in list(m._buffers):
            m._buffers[name] = None
        if isinstance(m, Int4Linear):
            m.weight_data = None
        m._fused = (fused, start, end)
        start = end
    if isinstance(fused, Int4Linear):
        fused.pack()
    return fused
