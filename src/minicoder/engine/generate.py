"""Single-request generation with a KV cache: completion and fill-in-the-middle.

The first version of the engine: prefill the prompt once, then decode one token per step reusing
cached keys and values. The serving engine grows from this (one generation path for everything).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..model import KVCache, LlamaForCausalLM
from ..tokenizer import Tokenizer
from .sampling import SamplingParams, apply_repetition_penalty, sample_next


class Generator:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.tokenizer = Tokenizer(model_dir)
        self.stop_ids = {self.tokenizer.eos_id, self.tokenizer.eot_id}

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield new token ids until a stop token (not yielded) or max_new_tokens."""
        params.validate()
        model = self.model
        limit = model.config.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
        max_len = min(limit, len(prompt_ids) + params.max_new_tokens)
        cache = KVCache(model.config, 1, max_len, dtype=next(model.parameters()).dtype)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        logits = model(torch.tensor([prompt_ids]), cache=cache, start=0, last_only=True)[0, -1]
        pos = len(prompt_ids)
        for _ in range(max_len - len(prompt_ids)):
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            token = sample_next(logits, params, generator)
            if token in self.stop_ids:
                return
            yield token
            seen = torch.cat([seen, torch.tensor([token])])
            if pos + 1 >= max_len:
                return
            logits = model(torch.tensor([[token]]), cache=cache, start=pos, last_only=True)[0, -1]
            pos += 1

    def prompt_ids(self, prompt: str, suffix: str | None = None) -> list[int]:
        if suffix is not None:
            return self.tokenizer.fim_prompt(prompt, suffix)
        return self.tokenizer.encode(prompt, bos=True)

    def generate(self, prompt: str, suffix: str | None = None, params: SamplingParams | None = None) -> str:
        ids = list(self.generate_ids(self.prompt_ids(prompt, suffix), params or SamplingParams()))
        return self.tokenizer.decode(ids)
