"""Where the LangChain classes get their text: the engine in-process, or an OpenAI-compatible server.

Both backends take the same requests -- a prompt (text to complete, or chat messages as role/content
dicts) plus `SamplingParams` -- and report `Chunk`s: text deltas as they are generated, the last one
carrying the finish reason and the token counts.

`LocalBackend` owns one `Engine` and one thread that steps it. Every caller (invoke, stream, batch,
their async forms, from any thread or event loop) submits to that engine, so concurrent requests are
batched together in its forward passes. `local_backend(path)` loads each model once per process.
`RemoteBackend` speaks the OpenAI API through the official `openai` client (sync and async), sending
vLLM's extra sampling fields (`top_k`, `repetition_penalty`), which `minicoder serve` understands.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..engine import Engine, EngineConfig, QueueFull, RequestFailed, RequestOutput, SamplingParams

log = logging.getLogger("minicoder.langchain")

Prompt = str | list[dict]  # text to complete, or chat messages ({"role", "content"})


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk only, with the token counts
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def last(self) -> bool:
        return self.finish_reason is not None


def join_chunks(chunks: list[Chunk]) -> Chunk:
    """One chunk holding a whole reply."""
    last = chunks[-1]
    return Chunk("".join(c.text for c in chunks), last.finish_reason, last.prompt_tokens, last.completion_tokens)


# --- in-process ------------------------------------------------------------------------------------
class LocalBackend:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.model_name = engine.model_path.resolve().name
        self._deliveries: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._wake = threading.Event()
        self._stepping = threading.Lock()  # held during a step; a batch holds it to queue all its prompts at once
        self._thread = threading.Thread(target=self._run, name="minicoder-langchain-engine", daemon=True)
        self._thread.start()

    # --- the stepping thread ---------------------------------------------------------------------
    def _run(self):
        while True:
            self._wake.clear()  # before the check: a submit after it sets the event again
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                with self._stepping:
                    outputs = self.engine.step()
            except Exception as error:  # a bug or out of memory: fail every waiting caller, keep serving
                log.exception("engine step failed")
                for request_id, deliver in list(self._deliveries.items()):
                    self._deliveries.pop(request_id, None)
                    self.engine.cancel(request_id)
                    deliver(error)
                continue
            for out in outputs:
                deliver = self._deliveries.get(out.request_id)
                if deliver is None:
                    continue
                if out.finished:
                    del self._deliveries[out.request_id]
                try:
                    deliver(out)
                except RuntimeError:  # the caller's event loop is gone
                    self.cancel(out.request_id)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.engine.prompts.completion(prompt) if isinstance(prompt, str) else self.engine.prompts.chat(prompt)

    def submit(self, ids: list[int], params: SamplingParams, deliver: Callable, max_retries: int = 0) -> str:
        """Queue a request; `deliver` gets each RequestOutput (or an exception) on the stepping thread.
        A full waiting queue is retried `max_retries` times with exponential backoff."""
        request_id = f"lc-{uuid.uuid4().hex[:12]}"
        self._deliveries[request_id] = deliver
        for attempt in range(max_retries + 1):
            try:
                self.engine.submit(ids, params, request_id)
                break
            except QueueFull:
                if attempt == max_retries:
                    self._deliveries.pop(request_id, None)
                    raise
                time.sleep(min(0.5 * 2**attempt, 8.0))
            except BaseException:
                self._deliveries.pop(request_id, None)
                raise
        self._wake.set()
        return request_id

    def cancel(self, request_id: str):
        self._deliveries.pop(request_id, None)
        self.engine.cancel(request_id)
        self._wake.set()

    # --- what the LangChain classes call -----------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams, timeout: float | None = None,
               max_retries: int = 0) -> Iterator[Chunk]:
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        request_id = self.submit(self.prompt_ids(prompt), params, outputs.put, max_retries)
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            while not finished:
                try:
                    item = outputs.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    raise _timeout(timeout) from None
                finished, chunk = _received(item)
                if chunk is not None:
                    yield chunk
        finally:
            if not finished:  # the consumer stopped early, timed out or failed: free the KV blocks
                self.cancel(request_id)

    async def astream(self, prompt: Prompt, params: SamplingParams, timeout: float | None = None,
                      max_retries: int = 0) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = await asyncio.to_thread(self.submit, self.prompt_ids(prompt), params,
                                             lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item),
                                             max_retries)
        deadline = None if timeout is None else loop.time() + timeout
        finished = False
        try:
            while not finished:
                try:
                    item = await asyncio.wait_for(outputs.get(), None if deadline is None else deadline - loop.time())
                except asyncio.TimeoutError:
                    raise _timeout(timeout) from None
                finished, chunk = _received(item)
                if chunk is not None:
                    yield chunk
        finally:
            if not finished:
                self.cancel(request_id)

    def complete_many(self, prompts: list[Prompt], params: SamplingParams, timeout: float | None = None,
                      max_retries: int = 0) -> list[Chunk]:
        """All prompts submitted before any finishes, so the engine steps them as one batch."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        request_ids = []
        all_ids = [self.prompt_ids(p) for p in prompts]
        delivery = [lambda item, i=i: outputs.put((i, item)) for i in range(len(prompts))]
        try:
            with self._stepping:  # no step starts until every prompt is queued: the scheduler admits them together
                for ids, deliver in zip(all_ids, delivery):
                    try:
                        request_ids.append(self.submit(ids, params, deliver))
                    except QueueFull:  # the rest waits for room below, with steps running again
                        break
            for ids, deliver in list(zip(all_ids, delivery))[len(request_ids):]:
                request_ids.append(self.submit(ids, params, deliver, max_retries))
            final: dict[int, RequestOutput] = {}
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(final) < len(prompts):
                try:
                    i, item = outputs.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    raise _timeout(timeout) from None
                _raise_failure(item)
                if item.finished:
                    final[i] = item
        finally:
            for request_id in request_ids:
                if request_id in self._deliveries:
                    self.cancel(request_id)
        return [_chunk(final[i], whole=True) for i in range(len(prompts))]


def _received(item: RequestOutput | BaseException) -> tuple[bool, Chunk | None]:
    """(finished, the chunk to pass on: None for an empty delta) of what the stepping thread delivered."""
    _raise_failure(item)
    chunk = _chunk(item)
    return item.finished, (chunk if chunk.text or chunk.last else None)


def _raise_failure(item: RequestOutput | BaseException):
    """An exception from the stepping thread, or a request the engine ended alone (finish_reason "error")."""
    if isinstance(item, BaseException):
        raise item
    if item.finish_reason == "error":
        raise RequestFailed(f"the engine failed request {item.request_id}: {getattr(item, 'error', None)}")


def _timeout(timeout: float | None) -> TimeoutError:
    return TimeoutError(f"generation took longer than timeout={timeout} s")


def _chunk(out: RequestOutput, whole: bool = False) -> Chunk:
    text = out.text if whole else out.delta_text
    if not out.finished:
        return Chunk(text)
    return Chunk(text, out.finish_reason, out.prompt_tokens, out.completion_tokens)


_local: dict[tuple, LocalBackend] = {}
_local_lock = threading.Lock()


def local_backend(model_dir: str | Path, dtype: str = "float32") -> LocalBackend:
    """The process's one engine for this model directory (loaded on first use, then shared)."""
    key = (str(Path(model_dir).resolve()), dtype)
    with _local_lock:
        if key not in _local:
            _local[key] = LocalBackend(Engine(model_dir, EngineConfig(dtype=dtype)))
        return _local[key]


# --- over HTTP -------------------------------------------------------------------------------------
class RemoteBackend:
    def __init__(self, base_url: str, api_key: str | None, model_name: str | None, timeout: float | None,
                 max_retries: int):
        import openai

        options = dict(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=max_retries)
        self.client = openai.OpenAI(**options)
        self.aclient = openai.AsyncOpenAI(**options)
        self._model_name = model_name

    @property
    def model_name(self) -> str:
        """The configured name, or the first model the server lists (`minicoder serve` has one)."""
        if self._model_name is None:
            models = self.client.models.list().data
            if not models:
                raise ValueError(f"{self.client.base_url} lists no models; pass model=NAME")
            self._model_name = models[0].id
        return self._model_name

    def _body(self, prompt: Prompt, params: SamplingParams, model: str | None, stream: bool) -> dict:
        body = dict(model=model or self.model_name, max_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_p=params.top_p, stop=params.stop_strings or None, seed=params.seed,
                    extra_body={"top_k": params.top_k, "repetition_penalty": params.repetition_penalty})
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body["messages"] = prompt
        return body

    def _create(self, client, prompt: Prompt):
        return client.completions.create if isinstance(prompt, str) else client.chat.completions.create

    def stream(self, prompt: Prompt, params: SamplingParams, model: str | None = None) -> Iterator[Chunk]:
        reply = _StreamedReply()
        with self._create(self.client, prompt)(**self._body(prompt, params, model, stream=True)) as events:
            for event in events:
                yield from reply.feed(event)
        yield reply.last()

    async def astream(self, prompt: Prompt, params: SamplingParams, model: str | None = None) -> AsyncIterator[Chunk]:
        reply = _StreamedReply()
        events = await self._create(self.aclient, prompt)(**self._body(prompt, params, model, stream=True))
        async with events:
            async for event in events:
                for chunk in reply.feed(event):
                    yield chunk
        yield reply.last()

    def complete_many(self, prompts: list[Prompt], params: SamplingParams, model: str | None = None) -> list[Chunk]:
        """One request per prompt, all in flight at once: the server's engine batches them (a single
        multi-prompt request would report only the total usage, not each prompt's)."""
        with ThreadPoolExecutor(max_workers=max(len(prompts), 1)) as pool:
            return list(pool.map(lambda p: self.complete(p, params, model), prompts))

    def complete(self, prompt: Prompt, params: SamplingParams, model: str | None = None) -> Chunk:
        response = self._create(self.client, prompt)(**self._body(prompt, params, model, stream=False))
        return _from_response(prompt, response)

    async def acomplete(self, prompt: Prompt, params: SamplingParams, model: str | None = None) -> Chunk:
        response = await self._create(self.aclient, prompt)(**self._body(prompt, params, model, stream=False))
        return _from_response(prompt, response)


def _from_response(prompt: Prompt, response) -> Chunk:
    choice = response.choices[0]
    text = choice.text if isinstance(prompt, str) else (choice.message.content or "")
    return _whole(text, choice.finish_reason, response.usage)


def _whole(text: str, finish_reason: str | None, usage) -> Chunk:
    """A finished reply (a server that reports no usage gets zero counts)."""
    return Chunk(text, finish_reason or "stop", usage.prompt_tokens if usage else 0,
                 usage.completion_tokens if usage else 0)


class _StreamedReply:
    """Server-sent events of one choice -> text chunks, then one last chunk with the finish reason and the
    usage (which OpenAI-style servers send in a final event of their own)."""

    def __init__(self):
        self.finish_reason = None
        self.usage = None

    def feed(self, event) -> list[Chunk]:
        chunks = []
        for choice in event.choices:
            delta = getattr(choice, "delta", None)
            text = delta.content if delta is not None else getattr(choice, "text", None)
            if text:
                chunks.append(Chunk(text))
            self.finish_reason = choice.finish_reason or self.finish_reason
        self.usage = event.usage or self.usage
        return chunks

    def last(self) -> Chunk:
        return _whole("", self.finish_reason, self.usage)
