"""How a step runs: one batched forward of the native Llama over the paged KV cache.

All scheduled tokens of a step (decodes and prefill chunks of any number of requests) are flattened into
one row each, so every Linear runs once per layer for the whole batch. Attention is the only per-request
part: single-token chunks (decodes) gather their cached blocks into one padded batch and share a single
`scaled_dot_product_attention` call with a padding mask; each longer chunk attends on its own.

The KV cache is, per layer, a tensor of shape (num_blocks, block_size, kv_heads, head_dim); token
position p of a request lives in slot p % block_size of block block_table[p // block_size].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import LlamaForCausalLM, ModelConfig, rope_tables


@dataclass
class SequenceChunk:
    """What the runner needs to know about one request's tokens in a step."""

    request_id: str
    token_ids: list[int]
    start: int  # position of token_ids[0]; positions before it are in the cache
    block_table: list[int]
    wants_logits: bool  # the last token's logits give the next token


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)  # as transformers: fp32 inside


def input_major(*linears: nn.Linear) -> torch.Tensor:
    """The Linears' weights as one contiguous (in_features, sum of out_features) matrix for `x @ W`.

    Fusing Linears that read the same input makes fewer, larger matmuls, and on CPU `x @ W` in this layout
    runs about twice as fast as `F.linear` with the (out, in) layout for the few rows of a decode step.
    The Linears are pointed at views of the new matrix, so the model keeps working and no second copy of
    the weights is held.
    """
    fused = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[:, offset : offset + rows].t(), requires_grad=False)
        offset += rows
    return fused


class _LayerWeights:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight.detach()
        self.qkv = input_major(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = input_major(attn.o_proj)
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        self.gate_up = input_major(mlp.gate_proj, mlp.up_proj)
        self.down = input_major(mlp.down_proj)


class _DecodeBatch:
    """Single-token chunks: rows 0..B-1 of the step, attending over a padded gather of their blocks."""

    def __init__(self, chunks: list[SequenceChunk]):
        self.size = len(chunks)
        lengths = [c.start + 1 for c in chunks]
        self.max_len = max(lengths)
        width = max(len(c.block_table) for c in chunks)
        self.blocks = torch.tensor([b for c in chunks for b in c.block_table + [0] * (width - len(c.block_table))])
        self.mask = None
        if min(lengths) < self.max_len:  # padding to hide
            keys = torch.arange(self.max_len)
            self.mask = (keys[None, :] < torch.tensor(lengths)[:, None]).view(self.size, 1, 1, self.max_len)


class _PrefillChunk:
    """A multi-token chunk: rows row..row+n-1, attending causally over its cached prefix and itself."""

    def __init__(self, chunk: SequenceChunk, row: int, block_size: int):
        self.row, self.n, self.start = row, len(chunk.token_ids), chunk.start
        self.length = self.start + self.n
        self.blocks = self.mask = None  # a chunk at position 0 attends to its own keys only
        if self.start > 0:
            self.blocks = torch.tensor(chunk.block_table[: -(-self.length // block_size)])
            self.mask = torch.ones(self.n, self.length, dtype=torch.bool).tril(diagonal=self.start)


class PagedLlamaRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        cfg = model.config
        self.config, self.block_size = cfg, block_size
        self.dtype = model.lm_head.weight.dtype
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.gqa = self.n_heads != self.n_kv
        self.model = model
        self.layers = [_LayerWeights(layer) for layer in model.model.layers]
        self.final_norm = model.model.norm.weight.detach()
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        self.lm_head = input_major(model.lm_head)  # (hidden, vocab)
        if tied:  # look up embeddings as columns of the one input-major copy
            model.model.embed_tokens.weight = model.lm_head.weight
            self.embed = None
        else:
            self.embed = model.model.embed_tokens.weight.detach()
        shape = (num_blocks, block_size, self.n_kv, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        # RoPE as x * cos + roll(x, half) * sin_signed: rotate_half(x) = roll(x, half) with the first half negated.
        cos, sin = rope_tables(cfg, torch.arange(cfg.max_position_embeddings))
        half = self.head_dim // 2
        self.cos = cos.to(self.dtype)
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(self.dtype)

    def release(self, request_id: str):
        """Nothing to do: the block tables say where everything is."""

    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Logits (one row per chunk that wants them, in chunk order) after writing every chunk's K/V."""
        bs = self.block_size
        # Decodes first, so they are rows 0..B-1 of the step.
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) > 1)
        ids, positions, slots, last_row = [], [], [], [0] * len(chunks)
        decodes, prefills = [], []
        for i in order:
            chunk = chunks[i]
            row, n = len(ids), len(chunk.token_ids)
            table = chunk.block_table
            ids += chunk.token_ids
            span = range(chunk.start, chunk.start + n)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            last_row[i] = row + n - 1
            if n == 1:
                decodes.append(chunk)
            else:
                prefills.append(_PrefillChunk(chunk, row, bs))
        decode = _DecodeBatch(decodes) if decodes else None
        slots = torch.tensor(slots)
        positions = torch.tensor(positions)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

        cfg, H, KV, hd = self.config, self.n_heads, self.n_kv, self.head_dim
        T, half, qk_width = len(ids), hd // 2, (H + KV) * hd
        ids = torch.tensor(ids)
        x = self.lm_head.index_select(1, ids).t() if self.embed is None else F.embedding(ids, self.embed)
        for k_cache, v_cache, w in zip(self.k_cache, self.v_cache, self.layers):
            h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
            qkv = h @ w.qkv
            qk = qkv[:, :qk_width].view(T, H + KV, hd)
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # RoPE on queries and keys at once
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, qk_width:].view(T, KV, hd)
            k_cache.view(-1, KV, hd).index_copy_(0, slots, k)
            v_cache.view(-1, KV, hd).index_copy_(0, slots, v)
            attn = self._attention(q, k, v, k_cache, v_cache, decode, prefills)
            x = torch.addmm(x, attn, w.o)
            h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
            gate_up = h @ w.gate_up
            gate, up = gate_up.chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w.down)
        rows = [last_row[i] for i, c in enumerate(chunks) if c.wants_logits]
        if len(rows) < T:
            x = x[rows]
        return rms_norm(x, self.final_norm, cfg.rms_norm_eps) @ self.lm_head

    def _attention(self, q, k, v, k_cache, v_cache, decode: _DecodeBatch | None, prefills: list[_PrefillChunk]):
        T, H, hd, KV = q.shape[0], self.n_heads, self.head_dim, self.n_kv
        if decode is not None:
            B, L = decode.size, decode.max_len
            keys = k_cache.index_select(0, decode.blocks).view(B, -1, KV, hd)[:, :L].transpose(1, 2)
            values = v_cache.index_select(0, decode.blocks).view(B, -1, KV, hd)[:, :L].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:B].unsqueeze(2), keys, values, attn_mask=decode.mask,
                                               enable_gqa=self.gqa)
            if B == T:  # a pure decode step
                return o.reshape(T, H * hd)
        out = q.new_empty(T, H, hd)
        if decode is not None:
            out[:B] = o.squeeze(2)
        for p in prefills:
            rows = slice(p.row, p.row + p.n)
            queries = q[rows].transpose(0, 1).unsqueeze(0)
            if p.start == 0:  # nothing cached before it: plain causal attention on its own keys
                keys, values, mask = k[rows], v[rows], None
            else:
                keys = k_cache.index_select(0, p.blocks).view(-1, KV, hd)[: p.length]
                values = v_cache.index_select(0, p.blocks).view(-1, KV, hd)[: p.length]
                mask = p.mask
            o = F.scaled_dot_product_attention(queries, keys.transpose(0, 1).unsqueeze(0),
                                               values.transpose(0, 1).unsqueeze(0), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=self.gqa)
            out[rows] = o[0].transpose(0, 1)
        return out.view(T, H * hd)
