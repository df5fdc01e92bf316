"""Prompt-lookup (n-gram) speculative decoding: draft tokens from the request's own text, verified in one forward.

Edit-style requests ("rewrite this function", a refactor, fill-in-the-middle in a file with similar code)
mostly copy spans of their prompt. Each step, for every request that is decoding, the proposer looks for
the most recent earlier occurrence of the request's last n tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`) in its prompt + output and proposes the up to K tokens that followed it. The
scheduler runs the request's last token plus its drafts as one chunk over the paged cache (the
chunked-prefill path), so one forward gives the model's next-token logits after each of them.

`verify` walks the positions in order and picks each one's token by the request's own rule, from the
same rows the sampler uses (min_tokens mask, temperature, top-k, top-p, min-p; sampler.py): the argmax
for greedy requests, one draw with the request's generator for sampled ones. A draft is accepted when
the picked token equals it, and the first token that differs ends the step (all K accepted: the token
after them too), so a step yields 1..K+1 tokens. For a sampled request this is rejection sampling with a
one-hot draft distribution (Leviathan et al. 2023; vLLM's rule for n-gram drafts): draft d is accepted with
probability p(d), and a rejected position's token is distributed as p with d removed and renormalized.
The output distribution is exactly plain sampling's; because each emitted token costs one draw, as without
speculation, a seeded request even gets the same text (up to float rounding between a one-token decode
and a multi-token verification forward, which can move a draw that falls on a boundary).
The keys/values of accepted drafts stay in the cache; the slots of rejected ones are rolled back
(`KVCacheManager.trim`) and overwritten by the next step.

Requests with repetition / presence / frequency penalties or a grammar do not speculate: their logits at
a draft position depend on the tokens before it, which the one forward does not know yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .request import Request
from .sampler import draw, filtered_probs, processed_logits

METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 64


@dataclass
class SpeculativeConfig:
    """vLLM's names: method "ngram", num_speculative_tokens, prompt_lookup_min / prompt_lookup_max."""

    method: str = "ngram"
    num_speculative_tokens: int = 5  # K: most draft tokens verified per request and step
    prompt_lookup_min: int = 2  # shortest suffix n-gram that may propose
    prompt_lookup_max: int = 4  # longest suffix n-gram tried (first)

    def validate(self):
        """Raise ValueError naming the field for a value the proposer cannot honour."""
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max "
                             f"({self.prompt_lookup_max})")


def propose_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix n-gram."""
    length = len(tokens)
    if k < 1 or length < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    # Earlier positions holding the last token (each followed by at least one token), then how far back
    # each match goes: one pass over the text, then work only on the candidates.
    ends = np.flatnonzero(arr[: length - 1] == arr[-1])
    matched = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for back in range(1, min(max_n, length - 1)):
        alive &= ends >= back
        alive[alive] = arr[ends[alive] - back] == arr[length - 1 - back]
        matched += alive
    if not len(ends) or (n := min(int(matched.max()), max_n)) < min_n:
        return []
    end = int(ends[matched >= n][-1])
    return arr[end + 1 : end + 1 + k].tolist()


def accept_greedy(logits: torch.Tensor, draft: list[int]) -> tuple[list[int], int]:
    """Tokens greedy decoding emits given `processed_logits` rows (len(draft) + 1, vocab, finite) after the last
    token and each draft.

    Returns (tokens, number of drafts accepted): the drafts that match the model's argmax, then its own token.
    """
    targets = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1], accepted


def accept_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator) -> tuple[list[int], int]:
    """Tokens sampling emits given its weights (len(draft) + 1, vocab) after the last token and each draft.

    Each position draws its token from its row; the draft is accepted when the draw equals it, which
    happens with probability p(d), and a draw that differs is the rejected position's token, distributed as
    p without d. Rows after the first rejection are never drawn from: the generator advances once per
    emitted token. Returns (tokens, number of drafts accepted).
    """
    tokens: list[int] = []
    for position, row in enumerate(probs):
        tokens.append(draw(row, generator))
        if position == len(draft) or tokens[-1] != draft[position]:
            break
    return tokens, len(tokens) - 1


def verify(logits: torch.Tensor, draft: list[int], request: Request) -> tuple[list[int], int]:
    """The request's tokens for one verified chunk: raw logits (len(draft) + 1, vocab), one row per position."""
    generated = len(request.output_ids)
    rows = processed_logits(logits, [request] * len(logits), list(range(generated, generated + len(logits))))
    if request.params.greedy:
        return accept_greedy(rows, draft)
    return accept_sampled(filtered_probs(rows, [request.params] * len(rows)), draft, request.generator)


class NgramProposer:
    """Drafts for one request, or none when its logits depend on the tokens before them (penalties, grammar)."""

    def __init__(self, config: SpeculativeConfig):
        config.validate()
        self.config = config

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """At most `max_tokens` drafts, when the request's next step is its last known token (a decode)."""
        if request.num_computed_tokens != len(request.token_ids) - 1:
            return []
        # Penalties count the tokens before each position and a grammar's mask follows them: the rows of a
        # draft position would need the drafts applied first, so these requests decode a token per step.
        if request.penalties is not None or request.grammar is not None:
            return []
        # The step emits up to len(draft) + 1 tokens: never more than max_tokens allows.
        k = min(self.config.num_speculative_tokens, max_tokens,
                request.max_output_tokens - len(request.output_ids) - 1)
        c = self.config
        return propose_ngram(request.token_ids, c.prompt_lookup_min, c.prompt_lookup_max, k)


@dataclass
class SpeculationStats:
    """Counters for `/metrics` (vLLM: spec_decode_num_draft_tokens / spec_decode_num_accepted_tokens)."""

    draft_tokens: int = 0  # proposed and verified
    accepted_tokens: int = 0  # of which the request's own greedy / sampled choice agreed with
    steps: int = 0  # request-steps that verified drafts

    def record(self, proposed: int, accepted: int):
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
