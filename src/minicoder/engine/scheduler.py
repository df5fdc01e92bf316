"""Who runs next: continuous batching with a per-step token budget (chunked prefill).

Every step, running requests go first (a decode costs one token of the budget, an unfinished prefill
takes what is left of it), then waiting requests join while there is budget, a free sequence slot and
KV blocks. A long prompt is prefilled a chunk per step, so it never stalls the running requests' decode.
When blocks run out, the most recently admitted request is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed later (mostly from the prefix cache). With speculative
decoding on, decodes then get draft tokens (speculation.py) from whatever budget and free blocks are left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .request import Request


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # token_ids[start : start + num_tokens] run this step
    draft_token_ids: list[int] = field(default_factory=list)  # speculated tokens run after them (speculation.py)
    start: int = field(init=False)
    samples: bool = field(init=False)  # the chunk reaches the last known token: its logits give the next one

    def __post_init__(self):
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_tokens == len(self.request.token_ids)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 propose: Callable[[Request, int], list[int]] | None = None):
        self.kv = kv
        self.propose = propose  # (request, most drafts) -> draft tokens, with speculative decoding on
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request):
        self.waiting.append(request)

    def remove(self, request: Request):
        """Take a finished or cancelled request out and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preemptions_before = self.num_preemptions
        for request in list(self.running):
            if budget == 0:
                break
            if request not in self.running:  # preempted a moment ago to make room
                continue
            n = min(len(request.token_ids) - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, n):
                chunks.append(ScheduledChunk(request, n))
                budget -= n
        # Admitting after a preemption would only evict the newcomer's blocks again.
        can_admit = self.num_preemptions == preemptions_before
        while can_admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            n = min(len(request.token_ids) - num_cached, budget)
            if not self.kv.allocate(request, n, cached):
                break
            self.waiting.popleft()
            self.kv.stats.record(len(request.token_ids), num_cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens == 0:  # a preempted request keeps its first count
                request.num_cached_tokens = num_cached
            self.running.append(request)
            chunks.append(ScheduledChunk(request, n))
            budget -= n
        if self.propose is not None:
            self._add_drafts(chunks, budget)
        return chunks

    def _add_drafts(self, chunks: list[ScheduledChunk], budget: int):
        """Speculative drafts for decodes, from what the step leaves: the token budget and free blocks no
        scheduled chunk needs, so speculating never delays a prefill or preempts a request."""
        for chunk in chunks:
            if budget == 0:
                return
            if chunk.num_tokens == 1 and chunk.samples:
                draft = self.propose(chunk.request, budget)
                if draft and self.kv.allocate(chunk.request, 1 + len(draft)):
                    chunk.draft_token_ids = draft
                    budget -= len(draft)

    def after_step(self, chunks: list[ScheduledChunk]):
        """The chunks' keys/values are now in the cache."""
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.register_full_blocks(chunk.request)

    def accept_drafts(self, request: Request, num_accepted: int):
        """The first `num_accepted` drafts of the request's last chunk were kept: their keys/values are
        valid cache entries. Blocks that only held rejected drafts go back to the pool."""
        request.num_computed_tokens += num_accepted
        self.kv.register_full_blocks(request)
        self.kv.trim(request, request.num_computed_tokens)

    def _allocate_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Blocks for a running request, preempting the latest admitted ones until they fit.
        False when the request itself had to go."""
        while not self.kv.allocate(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request):
        self.kv.free(request)
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1
