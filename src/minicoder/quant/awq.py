"""AWQ: activation-aware weight quantization (Lin et al. 2023), as LMDeploy's `lite auto_awq` and AutoAWQ do it.

Layer by layer, on calibration activations:
1. For each group of Linears that read one input (q/k/v after the input RMSNorm, o after v when there is no
   GQA, gate/up after the post-attention RMSNorm, down after up), search a per-input-channel scale
   s = mean|x|^a / mean|w|^(1-a) over a grid of a in [0, 1), normalized, that minimizes the error of the
   group's int4 outputs. Salient input channels (large activations) get larger weights, hence finer steps.
   s = 1 (plain rounding) is a candidate, so the search never does worse than RTN on the calibration data.
2. Fold 1/s into the op before (norm weight or the previous Linear's rows) and s into the weights:
   the float model computes the same function.
3. Clip search: per output channel and group, shrink the weight range (to 50%) where that lowers the
   output error (not for q/k, as in AutoAWQ: attention scores are sensitive to it).
4. Round to nearest (rtn.py); the next layer is fed by this layer in float, scaled and clipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model import rope_tables
from .rtn import Int4Weight, fake_quantize_int4, int4_range, quantize_int4

N_GRID = 20
SEARCH_TOKENS = 8192  # activation rows used in the scale search (AutoAWQ uses all; this bounds time on CPU)
CLIP_TOKENS = 512  # as AutoAWQ's n_sample_token
CLIP_SHRINK = 0.5  # as AutoAWQ's max_shrink


@dataclass
class GroupReport:
    layer: int
    names: list[str]
    ratio: float | None  # the chosen a; None = s = 1 kept
    rtn_error: float  # mean squared output error with plain rounding
    awq_error: float  # with the chosen scales


@dataclass
class AWQResult:
    weights: dict[str, Int4Weight]
    groups: list[GroupReport] = field(default_factory=list)
    seconds: float = 0.0


def _sample_rows(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def output_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor | None, group_size: int,
                 refs: list[torch.Tensor] | None = None) -> float:
    """Mean squared error of x @ W^T when each W is int4-quantized after scaling its input channels by `scales`
    (`refs`: the float outputs, when the caller has them already)."""
    total, count = 0.0, 0
    for i, w in enumerate(weights):
        ref = refs[i] if refs is not None else x @ w.t()
        if scales is None:
            q = fake_quantize_int4(w, group_size)
        else:
            q = fake_quantize_int4(w * scales, group_size) / scales
        total += (x @ q.t() - ref).pow(2).sum().item()
        count += ref.numel()
    return total / count


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, n_grid: int = N_GRID
                  ) -> tuple[torch.Tensor | None, float | None, float, float]:
    """(best scales or None for s = 1, its ratio, RTN error, best error) for Linears reading activations x."""
    x = _sample_rows(x.float(), SEARCH_TOKENS)
    x_mean = x.abs().mean(0)
    w = torch.cat(weights).float()
    n, k = w.shape
    w_mean = (w.abs().view(n, k // group_size, group_size) / w.abs().view(n, k // group_size, group_size)
              .amax(-1, keepdim=True).clamp(min=1e-8)).view(n, k).mean(0)
    ws = [wi.float() for wi in weights]
    refs = [x @ wi.t() for wi in ws]
    rtn = best = output_error(x, ws, None, group_size, refs)
    best_scales, best_ratio = None, None
    for i in range(n_grid):
        ratio = i / n_grid
        s = (x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(x, ws, s, group_size, refs)
        if err < best:
            best, best_scales, best_ratio = err, s, ratio
    return best_scales, best_ratio, rtn, best


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, n_grid: int = N_GRID, batch: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(output channel, group) (min, max) ranges that minimize the group-wise output error."""
    x = _sample_rows(x.float(), CLIP_TOKENS)
    n, k = w.shape
    groups = k // group_size
    xg = x.view(-1, groups, group_size)  # (tokens, groups, gs)
    lo_all, hi_all = int4_range(w, group_size)
    best_lo, best_hi = lo_all.clone(), hi_all.clone()
    for r0 in range(0, n, batch):
        wb = w[r0 : r0 + batch].float()
        wg = wb.view(-1, groups, group_size)
        ref = torch.einsum("tgk,ngk->ntg", xg, wg)
        lo, hi = lo_all[r0 : r0 + batch], hi_all[r0 : r0 + batch]
        best_err = torch.full_like(lo, float("inf"))
        for i in range(int(CLIP_SHRINK * n_grid)):
            shrink = 1 - i / n_grid
            cur_lo, cur_hi = lo * shrink, hi * shrink
            clipped = torch.maximum(torch.minimum(wg, cur_hi[..., None]), cur_lo[..., None]).view_as(wb)
            q = fake_quantize_int4(clipped, group_size, cur_lo, cur_hi).view(-1, groups, group_size)
            err = (torch.einsum("tgk,ngk->ntg", xg, q) - ref).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo[r0 : r0 + batch] = torch.where(better, cur_lo, best_lo[r0 : r0 + batch])
            best_hi[r0 : r0 + batch] = torch.where(better, cur_hi, best_hi[r0 : r0 + batch])
    return best_lo, best_hi


FORWARD_BATCH = 8  # calibration windows per layer forward: bounds the attention-score memory


def _forward(layer, x, cos, sin) -> torch.Tensor:
    return torch.cat([layer(x[i : i + FORWARD_BATCH], cos[i : i + FORWARD_BATCH], sin[i : i + FORWARD_BATCH])
                      for i in range(0, len(x), FORWARD_BATCH)])


def _layer_inputs(layer, named: dict, x, cos, sin) -> dict[str, torch.Tensor]:
    """The input of each named Linear of `layer` over all calibration tokens, (tokens, in_features)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    handles = [lin.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for name, lin in named.items()]
    try:
        _forward(layer, x, cos, sin)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def _scale_group(prev: torch.Tensor, linears, scales: torch.Tensor, prev_is_rows: bool):
    """Fold 1/scales into the op before (a norm weight, or the output rows of a Linear) and scales into the Linears."""
    if prev_is_rows:
        prev.div_(scales[:, None])
    else:
        prev.div_(scales)
    for lin in linears:
        lin.weight.mul_(scales)


@torch.no_grad()
def awq_quantize(model, tokens: torch.Tensor, group_size: int, skip: set[str] = frozenset(), clip: bool = True,
                 progress: bool = True) -> AWQResult:
    """Scale, clip and quantize every decoder Linear of a float32 `model` in place (its float weights keep the
    folded scales); returns the int4 weights and what the search found."""
    start = time.time()
    cfg = model.config
    result = AWQResult({})
    B, T = tokens.shape
    cos, sin = rope_tables(cfg, torch.arange(T).expand(B, T))
    x = model.model.embed_tokens(tokens).float()
    bar = tqdm(model.model.layers, desc="awq", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        attn, mlp = layer.self_attn, layer.mlp
        named = {f"model.layers.{i}.self_attn.{n}": getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        named.update({f"model.layers.{i}.mlp.{n}": getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")})
        inputs = _layer_inputs(layer, named, x, cos, sin)

        p = f"model.layers.{i}."
        groups = [([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                   layer.input_layernorm.weight, False),
                  ([p + "mlp.gate_proj", p + "mlp.up_proj"], layer.post_attention_layernorm.weight, False),
                  ([p + "mlp.down_proj"], mlp.up_proj.weight, True)]
        if attn.n_kv == attn.n_heads:  # with GQA, v's rows do not line up with o's inputs
            groups.insert(1, ([p + "self_attn.o_proj"], attn.v_proj.weight, True))
        for names, prev, prev_is_rows in groups:
            if any(n in skip for n in names):
                continue
            linears = [named[n] for n in names]
            scales, ratio, rtn_err, awq_err = search_scales(inputs[names[0]], [lin.weight for lin in linears], group_size)
            result.groups.append(GroupReport(i, names, ratio, rtn_err, awq_err))
            if scales is not None:
                _scale_group(prev, linears, scales, prev_is_rows)
                for n in names:
                    inputs[n] = inputs[n] / scales
        for name, lin in named.items():
            if name in skip:
                continue
            w = lin.weight
            if clip and not name.endswith(("q_proj", "k_proj")):
                lo, hi = search_clip(inputs[name], w, group_size)
                lin.weight.copy_(torch.maximum(torch.minimum(w.view(w.shape[0], -1, group_size), hi[..., None]),
                                               lo[..., None]).view_as(w))
                result.weights[name] = quantize_int4(lin.weight, group_size, lo, hi)
            else:
                result.weights[name] = quantize_int4(w, group_size)
        x = _forward(layer, x, cos, sin)  # the float layer (scaled, clipped) feeds the next one, as in AutoAWQ
    result.seconds = time.time() - start
    return result


def calibration_loss(model, tokens: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy of `model` on the calibration windows."""
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            t = tokens[i : i + batch]
            logits = model(t[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten(), reduction="sum").item()
    return total / (len(tokens) * (tokens.shape[1] - 1))
