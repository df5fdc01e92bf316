"""`SamplingParams`: how one request wants its tokens chosen and when it stops.

The one request description every caller fills in (CLI, server, LangChain, eval, agent); the engine's
batched sampler (`sampler.py`) honours all of it. One rule lives here rather than in each caller: a
temperature below GREEDY_BELOW (0 included) means greedy decoding, because dividing logits by a tiny
temperature overflows to inf and NaN, and its limit is the argmax anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .guided import GuidedDecoding

# Bounds of what a request may ask for. Beyond them the sampler's arithmetic overflows (a repetition
# penalty of 1e-40 turns logits into inf, then NaN probabilities) or the per-token cost grows with the
# request (every stop string is checked on every token), so they are refused at submit time.
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_ADDITIVE_PENALTY = 100.0  # presence / frequency (the API allows [-2, 2])
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 1000
GREEDY_BELOW = 1e-5  # temperatures below this are greedy


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # below GREEDY_BELOW (0 included): greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # --- honoured by the serving engine ---------------------------------------------------------
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # OpenAI-style, on generated tokens: subtract once per token seen
    frequency_penalty: float = 0.0  # ... and once per occurrence
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens exist
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (stop_token_ids still stop)
    stop: list[str] | str = field(default_factory=list)  # stop strings; the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: off; N: the chosen token's logprob and the N most likely
    # None: off; N: the same for every prompt token after the first, computed during prefill (such a
    # request does not reuse the prefix cache: cached positions would have no logits)
    prompt_logprobs: int | None = None
    guided: GuidedDecoding | None = None  # the output must match this JSON schema / grammar (engine/guided.py)

    def validate(self, vocab_size: int | None = None):
        """Raise ValueError (message starting with the field's name) for anything the sampler cannot honour.

        Every number must be finite and in range, and with `vocab_size` every token id must exist: a bad
        value caught here is a 400 for its sender instead of an exception inside a batch shared with others.
        """
        for name in ("temperature", "top_p", "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("max_new_tokens", "top_k", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_ADDITIVE_PENALTY <= getattr(self, name) <= MAX_ADDITIVE_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_ADDITIVE_PENALTY}, {MAX_ADDITIVE_PENALTY}], "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                raise ValueError(f"{name} must be in [0, 20], got {value}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(1 << 63) <= self.seed < 1 << 64):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        ids = self.stop_token_ids
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if vocab_size is not None and any(t >= vocab_size for t in ids):
            raise ValueError(f"stop_token_ids must be below the vocabulary size {vocab_size}, got {max(ids)}")

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list of non-empty strings (a bare string is accepted, as OpenAI's API does)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s != ""]

    @property
    def greedy(self) -> bool:
        """Argmax decoding: the temperature is 0 or too small to divide logits by (GREEDY_BELOW)."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
