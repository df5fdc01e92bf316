"""Decode attention that reads the paged KV cache where it lies, for the compiled decode step.

The eager runner gathers each request's blocks into a padded copy (`index_select`) and calls
`scaled_dot_product_attention`; that copy was 15-21% of a batch-16 decode step. Here one query token per
request attends over its cached tokens straight from the block pool: the block-table lookup
`cache[block_tables]` and the scores / weighted values are written as broadcast products and sums, which
inductor turns into reduction kernels that load each key and value through the block table (an indirect
load) instead of materialising the gather. Run eagerly the same code is correct but materialises the
gather and the products, so only the compiled step uses it.

The new token's key and value are passed separately (the step writes them into the pool after the
forward, for every layer at once), so the cached part is exactly positions 0..cached_len-1.
Scores and softmax are computed in fp32 whatever the cache's dtype, as the CPU SDPA kernel does.
"""

from __future__ import annotations

import torch


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, block_tables: torch.Tensor, cached_lens: torch.Tensor) -> torch.Tensor:
    """One query per request over its cached tokens plus its own new key/value.

    q: (B, H, hd); k_new, v_new: (B, KV, hd); k_cache, v_cache: (num_blocks, block_size, KV, hd);
    block_tables: (B, W) block ids (padding columns may hold any valid id); cached_lens: (B,) tokens already
    in the cache. Returns (B, H * hd) in q's dtype. Grouped-query attention: query head h reads KV head h // G.
    """
    B, H, hd = q.shape
    KV = k_new.shape[1]
    G = H // KV
    W, block_size = block_tables.shape[1], k_cache.shape[1]
    S = W * block_size
    keys = k_cache[block_tables].view(B, S, KV, 1, hd).float()  # an indirect load once compiled, not a copy
    values = v_cache[block_tables].view(B, S, KV, 1, hd).float()
    queries = q.float().view(B, 1, KV, G, hd) * hd**-0.5
    scores = (queries * keys).sum(-1)  # (B, S, KV, G)
    hidden = torch.arange(S, device=q.device)[None, :] >= cached_lens[:, None]  # (B, S): padding and unwritten slots
    scores = scores.masked_fill(hidden[:, :, None, None], float("-inf"))
    new_score = (queries[:, 0] * k_new.float()[:, :, None]).sum(-1)  # (B, KV, G)
    top = torch.maximum(scores.amax(1), new_score)  # the new token's score is finite: never an all -inf row
    weights, new_weight = torch.exp(scores - top[:, None]), torch.exp(new_score - top)
    total = weights.sum(1) + new_weight
    out = (weights[..., None] * values).sum(1) + new_weight[..., None] * v_new.float()[:, :, None]  # (B, KV, G, hd)
    return (out / total[..., None]).to(q.dtype).reshape(B, H * hd)
