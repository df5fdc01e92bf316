"""Batched next-token selection for the serving engine.

Greedy requests with nothing that changes their logits share one argmax. The others go through, in the
order transformers applies them: min-tokens masking and penalties (per request, vectorized over the
vocabulary), then temperature, top-k, top-p and min-p for all sampled rows at once, and finally one
`torch.multinomial` per request with the request's own generator, so a seed gives the same text in any
batch. A request that must match a grammar (JSON schema, `response_format`) has its row masked to the tokens
its grammar allows, after penalties and before temperature (engine/guided.py). Log-probabilities are
reported under the model's own distribution (before any of this).

`processed_logits` and `filtered_probs` are the whole rule: speculative verification (speculation.py) draws
each position's token from the same rows, so a speculating request samples exactly what it would without.
"""

from __future__ import annotations

import torch

from .request import Request, TokenLogprob
from .sampling_params import SamplingParams


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token per row of `logits` (rows, vocab); records requested logprobs on each request."""
    logits = logits.float()
    if all(r.plain_greedy and r.params.logprobs is None for r in requests):
        return logits.argmax(dim=-1).tolist()
    raw = logits
    logits = processed_logits(logits, requests)
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
    if sampled:
        probs = filtered_probs(logits[sampled], [requests[i].params for i in sampled])
        for row, i in enumerate(sampled):
            tokens[i] = draw(probs[row], requests[i].generator)
    for i, r in enumerate(requests):
        if r.logprobs is not None:
            r.logprobs.append(token_logprob(raw[i], tokens[i], r.params.logprobs))
    return tokens


def processed_logits(logits: torch.Tensor, requests: list[Request],
                     num_outputs: list[int] | None = None) -> torch.Tensor:
    """The logits row i's request chooses from (a new tensor): stop tokens masked while fewer than min_tokens
    exist (`num_outputs[i]` tokens generated before row i's; default: the request's output so far), then its
    penalties and grammar; NaN/inf made finite. Greedy decoding takes the argmax, sampling `filtered_probs`."""
    logits = logits.float().clone()
    for i, r in enumerate(requests):
        generated = len(r.output_ids) if num_outputs is None else num_outputs[i]
        if generated < r.params.min_new_tokens and r.stop_token_ids:
            logits[i, list(r.stop_token_ids)] = float("-inf")
        if r.penalties is not None:
            logits[i] = apply_penalties(logits[i], r)
    constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
    if constrained:
        apply_grammars(logits, [requests[i] for i in constrained], constrained)
    return finite_logits(logits)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (vocab,) row of `filtered_probs` (not necessarily normalized) with the request's generator."""
    return int(torch.multinomial(probs, 1, generator=generator))


def record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor):
    """Append the prompt logprobs that `logits` (one row per token from position `start`) give: row j
    predicts the token at start + j + 1. Positions already recorded (a chunk recomputed after preemption)
    are skipped, and positions past the prompt are the sampler's."""
    recorded = request.prompt_logprobs
    first, last = len(recorded), min(request.num_prompt_tokens - 1, start + len(logits))  # positions, inclusive
    if last < first:
        return
    if first <= start:  # the positions between would have no logprobs (a cached prefix was reused)
        raise RuntimeError(f"prompt logprobs recorded up to {first}, but this chunk starts at {start}")
    logprobs = logits[first - start - 1 : last - start].float().log_softmax(dim=-1)
    targets = torch.tensor(request.token_ids[first : last + 1])
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    top_n = request.params.prompt_logprobs
    tops = [[] for _ in chosen]
    if top_n > 0:
        values, ids = logprobs.topk(top_n, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    recorded += [TokenLogprob(t, c, top) for t, c, top in zip(targets.tolist(), chosen, tops)]


def apply_grammars(logits: torch.Tensor, requests: list[Request], rows: list[int]):
    """Mask each constrained row to the tokens its grammar allows next (in place).

    Stop tokens (end-of-sequence, the request's stop_token_ids) are allowed exactly where the grammar
    accepts; min_tokens holds them back only while the grammar offers something else to write."""
    allowed = requests[0].grammar.grammars.allowed_tokens([r.grammar for r in requests])
    for k, (row, r) in enumerate(zip(rows, requests)):
        if r.stop_token_ids:
            stops = list(r.stop_token_ids)
            allowed[k, stops] = r.grammar.accepting
            if len(r.output_ids) < r.params.min_new_tokens:
                without_stops = allowed[k].clone()
                without_stops[stops] = False
                if without_stops.any():
                    allowed[k] = without_stops
        logits[row].masked_fill_(~allowed[k], float("-inf"))


def apply_penalties(row: torch.Tensor, request: Request) -> torch.Tensor:
    """Repetition penalty over prompt + output (transformers/CTRL), presence and frequency over the output (OpenAI)."""
    p, state = request.params, request.penalties
    if p.repetition_penalty != 1.0:
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row = torch.where(state.seen, penalized, row)
    if p.frequency_penalty != 0.0:
        row = row - p.frequency_penalty * state.output_counts
    if p.presence_penalty != 0.0:
        row = row - p.presence_penalty * (state.output_counts > 0).float()
    return row


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sampling weights per row of `processed_logits`: temperature, top-k, top-p, then min-p (rows, vocab).

    Rows are not renormalized after min-p (torch.multinomial does not need it); a row with nothing left is
    one-hot on its argmax."""
    logits = finite_logits(logits / torch.tensor([p.temperature for p in params])[:, None])
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if min(top_k) < vocab:
        top_values = logits.topk(max(top_k), dim=-1).values
        kth = top_values.gather(-1, torch.tensor(top_k)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params])
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params])
    if (min_p > 0).any():
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return _with_fallback(probs, logits)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (impossible), +inf -> the largest finite float (certain), so softmax stays defined."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _with_fallback(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rows that are not a distribution (all masked, or NaN) become one-hot on their argmax."""
    total = probs.sum(dim=-1)
    bad = ~torch.isfinite(total) | (total <= 0) | torch.isnan(probs).any(dim=-1)
    if bad.any():
        probs = probs.clone()
        probs[bad] = torch.nn.functional.one_hot(logits[bad].argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
    return probs


def token_logprob(raw_logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """`token`'s logprob under a (vocab,) logits row and the `top_n` most likely (id, logprob) pairs."""
    logprobs = raw_logits.float().log_softmax(dim=-1)
    top = []
    if top_n > 0:
        values, ids = logprobs.topk(top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
