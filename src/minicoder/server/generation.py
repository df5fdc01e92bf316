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

from ..engine import AsyncEngine, RequestOutput, SamplingParams
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
        self.latest: list[RequestOutput | None] = [None] * len(requests)
        self.arrival = time.perf_counter()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.failed = False  # the engine raised while generating

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self):
        """Submit every choice to the engine. Raises what submit raises (QueueFull, ValueError), with
        nothing left running."""
        for i, (prompt_ids, params) in enumerate(self.requests):
            task = asyncio.create_task(self._pump(i, self.engine.stream(prompt_ids, params, self.engine_ids[i])))
            task.add_done_callback(self._on_pump_done)
            self._tasks.append(task)
        # Each task runs up to its first wait on the engine: by then its request is submitted, or
        # submit has raised (AsyncEngine.stream submits before it first waits).
        await asyncio.sleep(0)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                self.close(log_line=False)
                raise error

    def close(self, log_line: bool = True):
        """Cancel unfinished choices (their KV blocks are freed at the next engine step); log the request once."""
        if self._closed:
            return
        self._closed = True
        for i, task in enumerate(self._tasks):
            task.cancel()
            if not self._finished(i):
                self.engine.cancel(self.engine_ids[i])
        if log_line:
            self._record()

    # --- outputs -----------------------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, all choices merged, until all finish."""
        while not all(self._finished(i) for i in range(len(self.requests))):
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self.failed = True
                raise item
            self.latest[index] = item
            yield index, item

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
    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]):
        async for out in outputs:
            self._queue.put_nowait((index, out))

    def _on_pump_done(self, task: asyncio.Task):
        if not task.cancelled() and task.exception() is not None:
            self._queue.put_nowait((self._tasks.index(task), task.exception()))

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
