"""The decode step as one torch.compile graph: every layer of a pure-decode step in a few fused kernels.

An eager decode step of the demo model is ~700 aten ops of a few microseconds each; inductor fuses the
elementwise work (RMSNorm, RoPE, SiLU x up, residuals, the attention softmax) into C++ loops around the
matmuls, and attention reads the paged cache in place (paged_attention.py). Only pure-decode steps
(every request adds one token) run here: steps with a prefill chunk are dominated by their matmuls and
stay eager.

Compilation happens when the engine starts (`warm_up`), never in the hot path: one graph for batch 1 and
one with the batch size and the block-table width dynamic for every larger batch, so no batch or context
length recompiles later (a step that would recompile runs eagerly instead). Inductor's FX graph cache
keeps the compiled code under the user's cache directory, so a restart reloads it instead of compiling.

The graph reads the KV pool and returns each layer's new key/value; the runner writes them into the pool
afterwards with one `index_copy_` for all layers (no cache mutation inside the graph).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .paged_attention import decode_attention
from .runner import rms_norm

log = logging.getLogger("minicoder.engine")

MIN_TABLE_WIDTH = 2  # block tables are padded to at least 2 columns: a width of 1 would be its own graph


class CompileUnavailable(RuntimeError):
    """torch.compile cannot build the decode step here (no C++ compiler, an inductor error, ...)."""


def inductor_cache_dir() -> Path:
    """Where compiled code persists across restarts: $TORCHINDUCTOR_CACHE_DIR, else the user's cache dir."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minicoder" / "inductor"


class CompiledDecode:
    """`runner`'s pure-decode forward through torch.compile; `warm_up` compiles it or raises CompileUnavailable."""

    def __init__(self, runner):
        self.runner = runner
        self.calls = 0  # steps run on the compiled graph
        self.eager_steps = 0  # steps that ran eagerly because they would have recompiled
        self.compile_seconds = 0.0
        self._step = torch.compile(self._decode, fullgraph=True, dynamic=None)

    def warm_up(self) -> None:
        """Compile both graphs (batch 1; batch >= 2 with dynamic sizes) on dummy inputs; nothing is written."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
        started = time.perf_counter()
        try:
            with torch.inference_mode():  # as the runner calls it: a grad-mode switch would recompile
                for batch, width in ((1, 3), (2, 3)):  # width != batch: equal sizes would share one symbol
                    self._call(*self._dummy_inputs(batch, width))
        except Exception as e:  # inductor raises many kinds (missing compiler, lowering, codegen errors)
            first_line = (str(e).strip().splitlines() or [""])[0]  # inductor's messages run to pages
            raise CompileUnavailable(f"{type(e).__name__}: {first_line}") from e
        self.compile_seconds = time.perf_counter() - started

    def __call__(self, ids, positions, block_tables):
        """(logits (B, vocab), new keys (L, B, KV, hd), new values) or None when it would recompile.

        A decode token's position is also how many of its request's tokens are already cached."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = self._call(ids, positions, block_tables)
            self.calls += 1
            return out
        except RuntimeError as e:
            if "recompil" not in str(e).lower():
                raise
            if self.eager_steps == 0:
                log.warning("a decode step of shape %s would recompile; such steps run eagerly",
                            tuple(block_tables.shape))
            self.eager_steps += 1
            return None

    def _call(self, ids, positions, block_tables):
        for t in (ids, positions, block_tables):
            if t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(block_tables, 1)
        r = self.runner
        return self._step(ids, positions, block_tables, r.k_pool, r.v_pool)

    def _dummy_inputs(self, batch: int, width: int):
        return torch.zeros(batch, dtype=torch.long), torch.full((batch,), 1), torch.zeros(batch, width, dtype=torch.long)

    def _decode(self, ids, positions, block_tables, k_pool, v_pool):
        r = self.runner
        cfg = r.config
        H, KV, hd = r.n_heads, r.n_kv, r.head_dim
        B, half, qk_width = ids.shape[0], hd // 2, (H + KV) * hd
        x = r.lm_head[:, ids].t() if r.embed is None else F.embedding(ids, r.embed)
        cos, sin = r.cos[positions].unsqueeze(1), r.sin[positions].unsqueeze(1)
        new_k, new_v = [], []
        for layer, w in enumerate(r.layers):
            h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
            qkv = h @ w.qkv
            qk = qkv[:, :qk_width].view(B, H + KV, hd)
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, qk_width:].view(B, KV, hd)
            attn = decode_attention(q, k, v, k_pool[layer], v_pool[layer], block_tables, positions)
            x = x + attn @ w.o
            h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
            gate, up = (h @ w.gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w.down
            new_k.append(k)
            new_v.append(v)
        logits = rms_norm(x, r.final_norm, cfg.rms_norm_eps) @ r.lm_head
        return logits, torch.stack(new_k), torch.stack(new_v)

