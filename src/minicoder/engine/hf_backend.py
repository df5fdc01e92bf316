"""Any other local causal LM (DeepseekV2, Qwen2, ...) through `transformers`, behind the runner interface.

Each request keeps its own `transformers` cache and runs its chunk alone; the scheduler, sampling,
streaming and stop handling are the engine's, as for the native runner. The KV block pool only counts
tokens here (it bounds memory and concurrency); there is no prefix sharing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .runner import SequenceChunk


def load_transformers_model(path: str | Path, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from ..errors import MinicoderError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise MinicoderError(f"{path}: transformers cannot load this model ({type(e).__name__}: {e})") from None
    return model.eval()


class TransformersRunner:
    def __init__(self, model):
        self.model = model
        self.caches: dict[str, object] = {}

    def release(self, request_id: str):
        self.caches.pop(request_id, None)

    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        rows = []
        for chunk in chunks:
            cache = self.caches.get(chunk.request_id) if chunk.start > 0 else None  # start 0: new or recomputed
            if chunk.start > 0 and (cache is None or cache.get_seq_length() != chunk.start):
                raise RuntimeError(f"request {chunk.request_id}: cache out of step with the scheduler")
            n = len(chunk.token_ids)
            positions = torch.arange(chunk.start, chunk.start + n)
            out = self.model(
                input_ids=torch.tensor([chunk.token_ids]),
                position_ids=positions[None],
                cache_position=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if chunk.all_logits else 1,  # 0: every position's
            )
            self.caches[chunk.request_id] = out.past_key_values
            if chunk.all_logits:
                rows.append(out.logits[0])
            elif chunk.wants_logits:
                rows.append(out.logits[0, -1:])
        return torch.cat(rows) if rows else torch.empty(0)
