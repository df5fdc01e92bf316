"""How a step runs: one batched forward of the native Llama over the paged KV cache.

All scheduled tokens of a step (decodes and prefill chunks of any number of requests) are flattened into
one row each, so every Linear runs once per layer for the whole batch. Attention is the only per-request
part: single-token chunks (decodes) gather their cached blocks into one padded batch and share a single
`scaled_dot_product_attention` call with a padding mask; each longer chunk attends on its own.

The KV cache is, per layer, a tensor of shape (num_blocks, block_size, kv_heads, head_dim); token
position p of a request lives in slot p % block_size of block block_table[p // block_size]. With
`kv_cache_dtype` int8/int4 it holds uint8 codes plus a (.., 2) float16 scale/zero tensor per layer
(quant/kv.py): keys and values are quantized as they are written and every attention reads them back
dequantized, the new tokens of a step included, so what is computed does not depend on what was cached.

Quantized models (quant/linear.py layers instead of nn.Linear) run their fused q/k/v and gate/up on the
packed int8/int4 kernels; the float path keeps its input-major matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import LlamaForCausalLM, ModelConfig, rope_tables
from ..quant import kv as kvq
from ..quant.linear import QuantLinear, fuse


@dataclass
class SequenceChunk:
    """What the runner needs to know about one request's tokens in a step."""

    request_id: str
    token_ids: list[int]
    start: int  # position of token_ids[0]; positions before it are in the cache
    block_table: list[int]
    wants_logits: bool  # the last token's logits give the next token
    all_logits: bool = False  # every token's logits (prompt logprobs), not only the last one's
    num_draft: int = 0  # the last num_draft tokens are speculative drafts: logits after each of them too


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    return kvq.kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype,
                                  kv_cache_dtype)


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


def _matrix(*linears: nn.Module):
    """An input-major float matrix for `x @ W`, or, for quantized layers, one fused quantized layer."""
    if not any(isinstance(lin, QuantLinear) for lin in linears):
        return input_major(*linears)
    if len(linears) == 1:
        if hasattr(linears[0], "pack"):
            linears[0].pack()  # the runner only multiplies: drop the int4 layer's portable codes
        return linears[0]
    return fuse(list(linears)) or _Concat(linears)


class _Concat:
    """Layers of different formats (an int4 layer beside an int8 fallback) that read the same input."""

    def __init__(self, linears):
        self.linears = linears

    def __call__(self, x):
        return torch.cat([lin(x) for lin in self.linears], dim=-1)


def _project(x: torch.Tensor, w) -> torch.Tensor:
    return x @ w if isinstance(w, torch.Tensor) else w(x)


def _add_projection(residual: torch.Tensor, x: torch.Tensor, w) -> torch.Tensor:
    return torch.addmm(residual, x, w) if isinstance(w, torch.Tensor) else residual + w(x)


class _LayerWeights:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight.detach()
        self.qkv = _matrix(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = _matrix(attn.o_proj)
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        self.gate_up = _matrix(mlp.gate_proj, mlp.up_proj)
        self.down = _matrix(mlp.down_proj)


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


class _QuantizedKV:
    """One layer's int8/int4 keys or values: codes (num_blocks, block_size, kv_heads, width) and scale/zero."""

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, kv_cache_dtype: str):
        self.kv_cache_dtype = kv_cache_dtype
        self.codes = torch.zeros(num_blocks, block_size, kv_heads, kvq.code_width(head_dim, kv_cache_dtype),
                                 dtype=torch.uint8)
        self.meta = torch.zeros(num_blocks, block_size, kv_heads, 2, dtype=torch.float16)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store x (tokens, kv_heads, head_dim) at `slots`; returns x as it will be read back."""
        codes, meta = kvq.quantize(x, self.kv_cache_dtype)
        self.codes.view(-1, *codes.shape[1:]).index_copy_(0, slots, codes)
        self.meta.view(-1, *meta.shape[1:]).index_copy_(0, slots, meta)
        return kvq.dequantize(codes, meta, self.kv_cache_dtype, x.dtype)

    def gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The blocks' tokens dequantized: (len(blocks), block_size, kv_heads, head_dim)."""
        return kvq.dequantize(self.codes.index_select(0, blocks), self.meta.index_select(0, blocks),
                              self.kv_cache_dtype, dtype)


class _FloatKV:
    def __init__(self, data: torch.Tensor):
        self.data = data  # (num_blocks, block_size, kv_heads, head_dim): one layer's view of the pool

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.data.view(-1, *x.shape[1:]).index_copy_(0, slots, x)
        return x

    def gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.data.index_select(0, blocks)


class PagedLlamaRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        """Eager on construction; `compile_decode()` then moves pure-decode steps onto a compiled graph."""
        cfg = model.config
        self.config, self.block_size = cfg, block_size
        self.kv_cache_dtype = kv_cache_dtype
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
        self.k_pool = self.v_pool = None  # float caches: all layers in one tensor, so one write stores a step
        if kv_cache_dtype == "auto":
            shape = (len(self.layers), num_blocks, block_size, self.n_kv, self.head_dim)
            self.k_pool, self.v_pool = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
            self.k_cache, self.v_cache = [_FloatKV(t) for t in self.k_pool], [_FloatKV(t) for t in self.v_pool]
        else:
            def make_cache():
                return _QuantizedKV(num_blocks, block_size, self.n_kv, self.head_dim, kv_cache_dtype)
            self.k_cache = [make_cache() for _ in self.layers]
            self.v_cache = [make_cache() for _ in self.layers]
        self.compiled = None  # a CompiledDecode once compile_decode() succeeded
        # RoPE as x * cos + roll(x, half) * sin_signed: rotate_half(x) = roll(x, half) with the first half negated.
        cos, sin = rope_tables(cfg, torch.arange(cfg.max_position_embeddings))
        half = self.head_dim // 2
        self.cos = cos.to(self.dtype)
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(self.dtype)

    def release(self, request_id: str):
        """Nothing to do: the block tables say where everything is."""

    def compile_reason(self) -> str | None:
        """Why pure-decode steps cannot be compiled for this model (None: they can)."""
        if self.k_pool is None:
            return f"--kv-cache-dtype {self.kv_cache_dtype} runs eagerly"
        if not all(isinstance(m, torch.Tensor) for w in self.layers for m in (w.qkv, w.o, w.gate_up, w.down)):
            return "quantized weights run eagerly"
        return None

    def compile_decode(self) -> float:
        """Compile and warm up the pure-decode graph; returns the seconds it took. Raises CompileUnavailable."""
        from .compiled_decode import CompileUnavailable, CompiledDecode

        reason = self.compile_reason()
        if reason:
            raise CompileUnavailable(reason)
        compiled = CompiledDecode(self)
        compiled.warm_up()
        self.compiled = compiled
        return compiled.compile_seconds

    def weight_bytes(self) -> int:
        """Bytes of the weights a step reads (fused and packed as they are held; each tensor once)."""
        tensors = [self.lm_head, self.final_norm] + ([self.embed] if self.embed is not None else [])
        for w in self.layers:
            tensors += [w.input_norm, w.post_norm]
            for m in (w.qkv, w.o, w.gate_up, w.down):
                parts = m.linears if isinstance(m, _Concat) else [m]
                tensors += [t for p in parts for t in ([p] if isinstance(p, torch.Tensor) else p.buffers())]
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())

    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Logits after writing every chunk's K/V, in chunk order: a row per token of an `all_logits` chunk,
        1 + num_draft rows for a chunk with speculative drafts, one row (its last token's) for each other chunk
        that wants logits."""
        if self.compiled is not None and all(len(c.token_ids) == 1 for c in chunks):
            logits = self._compiled_decode(chunks)
            if logits is not None:
                return logits
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
            qkv = _project(h, w.qkv)
            qk = qkv[:, :qk_width].view(T, H + KV, hd)
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # RoPE on queries and keys at once
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, qk_width:].view(T, KV, hd)
            k, v = k_cache.write(slots, k), v_cache.write(slots, v)
            attn = self._attention(q, k, v, k_cache, v_cache, decode, prefills)
            x = _add_projection(x, attn, w.o)
            h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
            gate_up = _project(h, w.gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            x = _add_projection(x, F.silu(gate) * up, w.down)
        rows = []
        for i, c in enumerate(chunks):
            if c.all_logits:
                rows += range(last_row[i] - len(c.token_ids) + 1, last_row[i] + 1)
            elif c.wants_logits:
                rows += range(last_row[i] - c.num_draft, last_row[i] + 1)
        if rows != list(range(T)):  # a step of decodes alone is already in chunk order
            x = x[rows]
        return rms_norm(x, self.final_norm, cfg.rms_norm_eps) @ self.lm_head

    def _attention(self, q, k, v, k_cache, v_cache, decode: _DecodeBatch | None, prefills: list[_PrefillChunk]):
        T, H, hd, KV = q.shape[0], self.n_heads, self.head_dim, self.n_kv
        if decode is not None:
            B, L = decode.size, decode.max_len
            keys = k_cache.gather(decode.blocks, q.dtype).view(B, -1, KV, hd)[:, :L].transpose(1, 2)
            values = v_cache.gather(decode.blocks, q.dtype).view(B, -1, KV, hd)[:, :L].transpose(1, 2)
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
                keys = k_cache.gather(p.blocks, q.dtype).view(-1, KV, hd)[: p.length]
                values = v_cache.gather(p.blocks, q.dtype).view(-1, KV, hd)[: p.length]
                mask = p.mask
            o = F.scaled_dot_product_attention(queries, keys.transpose(0, 1).unsqueeze(0),
                                               values.transpose(0, 1).unsqueeze(0), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=self.gqa)
            out[rows] = o[0].transpose(0, 1)
        return out.view(T, H * hd)

    def _compiled_decode(self, chunks: list[SequenceChunk]) -> torch.Tensor | None:
        """A pure-decode step on the compiled graph, then every layer's new K/V written at once."""
        from .compiled_decode import MIN_TABLE_WIDTH

        bs = self.block_size
        starts = [c.start for c in chunks]
        width = max(MIN_TABLE_WIDTH, max(len(c.block_table) for c in chunks))
        tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in chunks])
        positions = torch.tensor(starts)
        out = self.compiled(torch.tensor([c.token_ids[0] for c in chunks]), positions, tables)
        if out is None:
            return None
        logits, new_k, new_v = out
        slots = torch.tensor([c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, starts)])
        L = len(self.layers)
        self.k_pool.view(L, -1, self.n_kv, self.head_dim).index_copy_(1, slots, new_k)
        self.v_pool.view(L, -1, self.n_kv, self.head_dim).index_copy_(1, slots, new_v)
        rows = [i for i, c in enumerate(chunks) if c.wants_logits]
        return logits if len(rows) == len(chunks) else logits[rows]
