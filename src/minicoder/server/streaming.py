"""How generations leave the server: server-sent events, the error event a failed stream ends with, and the
cancel-on-disconnect wait of non-streaming responses. Shared by every API family's routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .errors import APIError, log_internal_error
from .generation import Generation

T = TypeVar("T")


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def stream_error(generation: Generation, error: Exception) -> str:
    message = log_internal_error(error, f"{generation.id} while streaming")
    body = APIError(f"generation failed: {message}", status=500, type="internal_error", code="internal_error").body()
    return f"data: {json.dumps(body)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that always run `on_close` (cancelling unfinished engine requests) however the
    response ends: finished, client gone before or during the stream, or send failed."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], media_type: str = "text/event-stream"):
        super().__init__(events, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ClientGone(APIError):
    def __init__(self):
        super().__init__("the client closed the connection", status=499, code="client_closed_request")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (a non-streaming request's generation
    would otherwise run to its end for nobody)."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        finished = task.done()
        if not finished:
            task.cancel()
    if finished:
        return task.result()
    raise ClientGone()
