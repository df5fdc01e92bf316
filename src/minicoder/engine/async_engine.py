"""`AsyncEngine`: the engine for asyncio servers.

One background task drives `Engine.step` in a worker thread (torch releases the GIL, so the event loop
keeps serving) and hands each request's outputs to the coroutine that streams them. A client that goes
away cancels its request, which frees its KV blocks at the next step. A request the engine fails alone
(finish_reason "error") raises `RequestFailed` in its own consumer only; the others keep streaming.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .engine import Engine, EngineConfig, EngineStats
from .prompts import PromptBuilder
from .request import RequestFailed, RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("minicoder.engine")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # --- what servers need to know about the model and the engine ------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def prompts(self) -> PromptBuilder:
        return self.engine.prompts

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def model_path(self) -> Path:
        return self.engine.model_path

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def dtype(self):
        """The dtype the weights run in, as resolved at load (`--dtype auto` becomes bf16 or fp32 here)."""
        return self.engine.dtype

    @property
    def grammars(self):
        """The engine's grammar compiler (engine/guided.py): routes check a response_format before queueing it."""
        return self.engine.grammars

    @property
    def max_request_tokens(self) -> int:
        """Prompt + completion tokens one request may hold (the context, or less when the KV cache is smaller)."""
        return self.engine.max_request_tokens

    @property
    def eos_token_ids(self) -> set[int]:
        return self.engine.eos_token_ids

    @property
    def generated_tokens(self) -> int:
        return self.engine.generated_tokens

    @property
    def num_parameters(self) -> int | None:
        model = getattr(self.engine.runner, "model", None)
        return sum(p.numel() for p in model.parameters()) if model is not None else None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @classmethod
    def from_pretrained(cls, model_path: str | Path, config: EngineConfig | None = None) -> "AsyncEngine":
        return cls(Engine(model_path, config))

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes. Raises QueueFull when the queue is full.

        A consumer that stops early is cancelled when the generator closes: at once for a cancelled task
        (a client disconnect), and for a plain `break` when iterating under `contextlib.aclosing`.
        """
        self._ensure_loop()
        request_id = self.engine.submit(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.finish_reason == "error":
                    raise RequestFailed(f"request {request_id}: {item.error}")
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancelled task)
                self.engine.cancel(request_id)
                self._wake.set()

    def submit(self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
               outputs: asyncio.Queue) -> str:
        """Submit a request whose outputs go onto `outputs`, a queue several requests may share (the n choices
        of one API call: their consumer then wakes once per step for all of them). Raises QueueFull and
        ValueError as `Engine.submit`. Outputs with finish_reason "error" are put like any other; a consumer
        that stops early must `cancel` the requests it has not seen finish."""
        self._ensure_loop()
        request_id = self.engine.submit(prompt, params, request_id)
        self._queues[request_id] = outputs
        self._wake.set()
        return request_id

    async def complete(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestOutput:
        """The final output of one request."""
        output = None
        async for output in self.stream(prompt, params):
            pass
        return output

    def cancel(self, request_id: str):
        self.engine.cancel(request_id)
        if self._wake is not None:
            self._wake.set()

    async def close(self):
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._executor.shutdown(wait=True)

    def _ensure_loop(self):
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():  # cancelled requests count until a step retires them
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception:  # no single request explains it (a scheduler bug): fail them all, keep serving
                log.exception("an engine step failed; failing every request in it")
                outputs = await loop.run_in_executor(self._executor, self.engine.fail_all, "the engine step failed")
            for out in outputs:
                queue = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
