"""Grammar-constrained decoding: what a request's output must match, and the per-request matcher state.

A request with `SamplingParams.guided` gets a `GrammarState` (an llguidance matcher). Each step the batched
sampler asks every constrained row for its allowed-token bitmask, masks that row's logits (rows without a
grammar are untouched and cost nothing), samples, and the request advances its matcher with the chosen
token. End-of-sequence tokens are allowed only where the grammar accepts, and a request whose grammar can
take no further token ends at once (finish_reason "stop"). A preempted request keeps its matcher: preemption
recomputes keys/values for tokens already sampled, it never samples them again.

Why llguidance rather than xgrammar: schemas compile ~30x faster (a new tool list is a new schema, paid in
the first token's latency), masks cost microseconds either way, and the wheel has no dependencies (xgrammar
pulls triton). The measurements are in docs/ARCHITECTURE.md (benchmarks/guided_bench.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

# JSON is generated compactly (`{"a": 1, "b": [2, 3]}`): with free whitespace, a weak model can spend its
# whole budget on blanks inside an object that is never closed.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}
MAX_CACHED_GRAMMARS = 256


@dataclass(frozen=True)
class GuidedDecoding:
    """What the output must be: JSON matching `json_schema` (a JSON Schema as a JSON string), any JSON
    object (`json_object`), or text matching a Lark grammar (`lark`, llguidance's dialect). One of them."""

    json_schema: str | None = None
    json_object: bool = False
    lark: str | None = None

    @classmethod
    def from_schema(cls, schema: dict) -> "GuidedDecoding":
        return cls(json_schema=json.dumps(schema, sort_keys=True))

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        from llguidance import LLMatcher

        if self.lark is not None:
            return LLMatcher.grammar_from_lark(self.lark)
        schema = self.json_schema if self.json_schema is not None else json.dumps(ANY_JSON_OBJECT)
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid: {e}") from None


class Grammars:
    """The grammar side of one engine: its tokenizer as llguidance sees it, compiled-grammar checks, matchers.

    The llguidance tokenizer is built on the first constrained request (about a second for a 32K vocabulary),
    so an engine that never sees one pays nothing."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()
        self._checked: dict[GuidedDecoding, str] = {}

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def check(self, guided: GuidedDecoding) -> str:
        """The grammar for `guided`, or ValueError saying what is wrong with it (checks are remembered:
        clients send the same schema again and again)."""
        from llguidance import LLMatcher

        grammar = self._checked.get(guided)
        if grammar is None:
            grammar = guided.grammar()
            is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if is_error:
                raise ValueError(messages[0] if messages else "the grammar is not valid")
            with self._lock:
                if len(self._checked) >= MAX_CACHED_GRAMMARS:
                    self._checked.pop(next(iter(self._checked)))
                self._checked[guided] = grammar
        return grammar

    def state(self, guided: GuidedDecoding) -> "GrammarState":
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, self.check(guided), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        return GrammarState(matcher, self)

    def allowed_tokens(self, states: list["GrammarState"]) -> torch.Tensor:
        """(len(states), vocab) bool: the tokens each grammar allows next.

        Masks are written straight into a tensor through llguidance's pointer API: its `llguidance.torch`
        helpers import torch.compile on first use, which costs seconds on CPU."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros((len(states), words), dtype=torch.int32)
        row_bytes = words * 4
        # One after the other: llguidance's thread pool (LLExecutor) cost more than it saved at batch 8
        # (see the table above); a mask takes microseconds, a forward pass milliseconds.
        for i, state in enumerate(states):
            state.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * row_bytes, row_bytes)
        return unpack_bitmask(bitmask, self.vocab_size)


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher, grammars: Grammars):
        self.matcher = matcher
        self.grammars = grammars  # computes the masks of a batch's grammars together

    def accept(self, token: int):
        """Advance by the sampled token; ValueError if the grammar does not allow it."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not match the grammar: {self.matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """The output so far is complete: the request may end here."""
        return self.matcher.is_accepting()

    @property
    def complete(self) -> bool:
        """No token but end-of-sequence can follow: the request ends now."""
        return self.matcher.is_stopped()


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, ceil(vocab/32)) int32 words, bit j of word w = token 32w+j allowed -> (rows, vocab) bool.
    (llguidance's own `apply_token_bitmask_inplace` goes through torch.compile, which needs a C++ compiler
    and seconds of warm-up on CPU; this is a few vectorized integer ops.)"""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
