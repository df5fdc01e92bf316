"""The engine requests behind one API call: n choices for each prompt, submitted together, streamed
merged, cancelled together when the client goes away, logged as one line.

    generation = Generation(engine, "cmpl-1", [(prompt_ids, params), ...], metrics)
    await generation.start()                  # QueueFull / ValueError here, before any response is sent
    try:
        async for index, output in generation.stream():
            ...
    finally:
        generation.close()                    # cancels what is unfinished; logs the request
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ..engine import AsyncEngine, RequestFailed, RequestOutput, SamplingParams
from ..engine.request import merge_outputs
from .metrics import ServerMetrics

log = logging.getLogger("minicoder.server")


class Generation:
    def __init__(self, engine: AsyncEngine, request_id: str, requests: list[tuple[list[int], SamplingParams]],
                 metrics: ServerMetrics | None = None, prompt_groups: list[int] | None = None):
        """`requests`: (prompt token ids, params) per choice; `prompt_groups[i]`: which prompt choice i
        answers (choices of one prompt count its tokens once in usage)."""
        self.engine = engine
        self.id = request_id
        self.requests = requests
        self.metrics = metrics
        self.prompt_groups = prompt_groups or list(range(len(requests)))
        self.engine_ids = [f"{request_id}-{i}" for i in range(len(requests))]
        self._index = {engine_id: i for i, engine_id in enumerate(self.engine_ids)}
        self.latest: list[RequestOutput | None] = [None] * len(requests)
        self.arrival = time.perf_counter()
        self._outputs: asyncio.Queue = asyncio.Queue()  # every choice's engine outputs, step by step
        self._submitted = 0
        self._closed = False
        self.failed = False  # the engine raised while generating

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self):
        """Submit every choice to the engine. Raises what submit raises (QueueFull, ValueError), with
        nothing left running."""
        try:
            for i, (prompt_ids, params) in enumerate(self.requests):
                self.engine.submit(prompt_ids, params, self.engine_ids[i], self._outputs)
                self._submitted += 1
        except Exception:
            self.close(log_line=False)
            raise

    def close(self, log_line: bool = True):
        """Cancel unfinished choices (their KV blocks are freed at the next engine step); log the request once."""
        if self._closed:
            return
        self._closed = True
        for i in range(self._submitted):
            if not self._finished(i):
                self.engine.cancel(self.engine_ids[i])
        if log_line:
            self._record()

    # --- outputs -----------------------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, all choices merged, until all finish.

        Whatever is queued when the consumer wakes is taken at once, and a choice's outputs merged into one
        (text and tokens joined): a consumer that falls behind the engine catches up in one write per choice
        instead of one per token."""
        while not all(self._finished(i) for i in range(len(self.requests))):
            batch = [await self._outputs.get()]
            while not self._outputs.empty():
                batch.append(self._outputs.get_nowait())
            merged: dict[int, RequestOutput] = {}
            for out in batch:
                index = self._index[out.request_id]
                merged[index] = merge_outputs(merged[index], out) if index in merged else out
            for index, out in merged.items():
                if out.finish_reason == "error":
                    self.failed = True
                    raise RequestFailed(f"request {out.request_id}: {out.error}")
                self.latest[index] = out
                yield index, out

    async def results(self) -> list[RequestOutput]:
        """The final output of every choice."""
        async for _ in self.stream():
            pass
        return list(self.latest)

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, cached prompt tokens) so far, each prompt counted once."""
        prompt = {}
        completion = cached = 0
        for group, (prompt_ids, _), out in zip(self.prompt_groups, self.requests, self.latest):
            if group not in prompt:
                prompt[group] = len(prompt_ids)
                cached += out.cached_tokens if out is not None else 0
            completion += out.completion_tokens if out is not None else 0
        return sum(prompt.values()), completion, cached

    # --- internals ---------------------------------------------------------------------------------
    def _finished(self, index: int) -> bool:
        out = self.latest[index]
        return out is not None and out.finished
    def _record(self):
        unfinished = "error" if self.failed else "abort"  # abort: the client went away
        reasons = [out.finish_reason if out is not None and out.finished and out.finish_reason != "cancelled"
                   else unfinished for out in self.latest]
        prompt_tokens, completion_tokens, cached = self.usage()
        ttfts = [out.time_to_first_token for out in self.latest if out is not None and out.time_to_first_token]
        ttft = min(ttfts) if ttfts else None
        seconds = time.perf_counter() - self.arrival
        if self.metrics is not None:
            self.metrics.request_done(reasons, prompt_tokens, completion_tokens, ttft, seconds)
            for out in self.latest:
                if out is not None:
                    self.metrics.drafts_done(out.draft_tokens, out.accepted_draft_tokens)
        log.info("%s: %d prompt tokens (%d cached), %d completion tokens, first token %s, total %.3f s, finish %s",
                 self.id, prompt_tokens, cached, completion_tokens, "-" if ttft is None else f"{ttft:.3f} s",
                 seconds, ",".join(reasons))
