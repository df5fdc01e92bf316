"""One generation request inside the engine, and what the engine reports about it after each step."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from .detokenizer import IncrementalDetokenizer, StopStringFilter
from .guided import GrammarState
from .sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]  # error: failed alone, see `error`


class RequestFailed(RuntimeError):
    """The engine failed this request (and only it) while generating; the log has the details."""


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the `top` most likely (id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A request's state after a step: the new part (`delta_*`) and everything so far."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # for token_ids, when asked for
    delta_logprobs: list[TokenLogprob] | None  # for delta_token_ids
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys/values came from the prefix cache
    time_to_first_token: float | None  # seconds from submit to the first generated token
    error: str | None = None  # with finish_reason "error": what failed (details are in the log)
    # With params.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it);
    # complete once the prefill is done.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    draft_tokens: int = 0  # speculative decoding: draft tokens verified for this request so far
    accepted_draft_tokens: int = 0  # ... of which the model agreed with (each one a forward saved)


class PenaltyState:
    """What repetition / presence / frequency penalties need: tokens seen (prompt + output), output counts."""

    def __init__(self, vocab_size: int, prompt_ids: list[int]):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)

    def add(self, token: int):
        self.seen[token] = True
        self.output_counts[token] += 1


class Request:
    """Tokens so far (prompt + output) and how many of them have keys/values in the cache.

    One view serves prefill, chunked prefill, decode and recompute after preemption: each step computes
    `token_ids[num_computed_tokens : num_computed_tokens + n]` and samples when that reaches the end.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, tokenizer,
                 vocab_size: int, eos_token_ids: set[int], max_total_tokens: int, grammar: GrammarState | None = None):
        self.id = request_id
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.output_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled by the KV cache manager
        self.max_output_tokens = min(params.max_new_tokens, max_total_tokens - len(prompt_ids))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(stops)
        self.generator = None
        if not params.greedy:  # one generator per request: the same seed gives the same text in any batch
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.penalties = PenaltyState(vocab_size, prompt_ids) if params.penalized else None
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_filter = StopStringFilter(params.stop_strings)
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # filled up to num_prompt_tokens as the prefill runs
        self.grammar = grammar  # where the output is in its grammar, when it must match one
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt positions still lack their logprobs: the runner must return every row of this request's chunks."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def record_drafts(self, proposed: int, accepted: int):
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes logits: the batch can take one argmax for all such requests."""
        p = self.params
        return p.greedy and self.penalties is None and self.grammar is None and len(self.output_ids) >= p.min_new_tokens

    def append_token(self, token: int) -> str:
        """Record a sampled token, decide whether the request is done; return the text safe to stream now."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(token)
        self.output_ids.append(token)
        if self.penalties is not None:
            self.penalties.add(token)
        if token in self.stop_token_ids:
            self.finish_reason = "stop"  # the stop token counts as generated but is not part of the text
        else:
            if self.grammar is not None:
                self.grammar.accept(token)  # the sampler only offered allowed tokens: a refusal is a bug
            if self.stop_filter.add(self.detokenizer.add(token)):
                self.finish_reason = "stop"
            elif self.grammar is not None and self.grammar.complete:
                self.finish_reason = "stop"  # nothing but end-of-sequence could follow
            elif len(self.output_ids) >= self.max_output_tokens:
                self.finish_reason = "length"
        if self.finished:
            return self.stop_filter.flush(self.detokenizer.flush())
        return self.stop_filter.release()

    def cancel(self) -> str:
        self.finish_reason = "cancelled"
        return self.stop_filter.flush(self.detokenizer.flush())

    def fail(self, reason: str):
        self.finish_reason = "error"
        self.error = reason

    def output(self, delta_text: str, delta_token_ids: list[int]) -> RequestOutput:
        logprobs = delta_logprobs = None
        if self.logprobs is not None:
            logprobs = list(self.logprobs)
            delta_logprobs = logprobs[len(logprobs) - len(delta_token_ids) :]
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        return RequestOutput(
            request_id=self.id,
            delta_text=delta_text,
            delta_token_ids=delta_token_ids,
            text=self.stop_filter.text,
            token_ids=list(self.output_ids),
            logprobs=logprobs,
            delta_logprobs=delta_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.output_ids),
            cached_tokens=self.num_cached_tokens,
            time_to_first_token=ttft,
            error=self.error,
            prompt_logprobs=self.prompt_logprobs,
            draft_tokens=self.num_draft_tokens,
            accepted_draft_tokens=self.num_accepted_tokens,
        )


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two successive outputs of one request as one: the later state, with both steps' deltas."""
    delta_logprobs = None
    if later.delta_logprobs is not None:
        delta_logprobs = (earlier.delta_logprobs or []) + later.delta_logprobs
    return dataclasses.replace(later, delta_text=earlier.delta_text + later.delta_text,
                               delta_token_ids=earlier.delta_token_ids + later.delta_token_ids,
                               delta_logprobs=delta_logprobs)
