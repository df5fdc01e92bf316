"""Limits that keep one client from starving the others before a request reaches a route.

- `BodySizeLimit`: an ASGI middleware that answers 413 to a body over the limit, from its Content-Length
  at once, or as soon as a chunked body grows past it, so a 20 MB upload is never buffered or parsed.
- `header_timeout_protocol`: uvicorn's h11 protocol with a header-read timeout. uvicorn closes idle
  keep-alive connections but has no limit on how long a client may take to send its request headers, so
  a few hundred clients that send half a request line each ("slowloris") hold their sockets forever.
- `uvicorn_config`: the uvicorn settings `minicoder serve` runs with (connection limit, keep-alive and
  header timeouts, header size), shared by the command and the tests that start a real server.
"""

from __future__ import annotations

import asyncio
import json


DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: far more than the text of any context window the server holds
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1024  # beyond it uvicorn answers 503 (each open stream holds a socket and a task)
MAX_HEADER_BYTES = 64 << 10  # request line + headers


class BodySizeLimit:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(send, bad_length=not length.isdigit())
        if length is not None:  # h11 delivers no more than Content-Length says
            return await self.app(scope, receive, send)
        # A chunked body: read it here, up to the limit, and hand the app what was read. (Raising from
        # inside the app's receive would not do: FastAPI turns errors while reading a body into a 400.)
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > limit:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, bad_length: bool = False):
        status = 400 if bad_length else 413
        message = ("the Content-Length header is not a number" if bad_length else
                   f"the request body is larger than this server accepts ({self.max_body_bytes} bytes)")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_content_length" if bad_length else "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `seconds`
    after it opened (or after its previous response finished). Built on call, so that importing this
    module (the command line does, for the defaults) does not import uvicorn."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timeout = seconds

        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm_header_timer()

        def data_received(self, data: bytes):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the request is the app's now
                self._cancel_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()  # the next request on this keep-alive connection gets the same limit

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

        def _cancel_header_timer(self):
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %g s",
                                 self.header_timeout)
                self.transport.close()

    return HeaderTimeoutH11Protocol


def uvicorn_config(app, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS, **kwargs):
    import uvicorn

    return uvicorn.Config(app, http=header_timeout_protocol(header_timeout), limit_concurrency=max_connections,
                          timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
