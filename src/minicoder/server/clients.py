"""Wires the third-party client APIs into the app: llama.cpp's `/infill`, Ollama's `/api/*`, Tabby's
`/v1/health` and `/v1/completions` body, vLLM's tokenizer routes, and the repository context they share.

Tabby's agent posts `{language, segments}` to `/v1/completions`, the path of OpenAI's completions route;
`TabbyDispatch` sends such bodies to the Tabby route (also reachable as `/v1/tabby/completions`) and
everything else on to the OpenAI route, unchanged.
"""

from __future__ import annotations

import json

from fastapi import FastAPI

from .fim_context import FimContext
from .repo_index import RepoIndex

TABBY_COMPLETIONS = "/v1/tabby/completions"


def fim_context(prompts, context: int, settings, max_chars: int | None = None) -> FimContext:
    """The fill-in-the-middle prompt builder, with a watched `--repo` index when `settings.repo` is set."""
    index = None
    if settings.repo:
        index = RepoIndex(settings.repo, lambda text: len(prompts.text(text)))
        index.watch()
    return FimContext(prompts, context, index, settings.repo_context_tokens, max_chars=max_chars)


def include_client_routers(app: FastAPI, server):
    from . import llamacpp, ollama, tabby, tokenizer_routes  # here, not at the top: tabby.py imports this module

    for module in (llamacpp, ollama, tabby, tokenizer_routes):
        app.include_router(module.router(server))
    app.add_middleware(TabbyDispatch)


def is_tabby_body(body: bytes) -> bool:
    if b'"segments"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "segments" in parsed and "prompt" not in parsed


class TabbyDispatch:
    """ASGI middleware: `POST /v1/completions` with a Tabby body goes to the Tabby route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        parts, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            parts.append(message.get("body", b""))
        body = b"".join(parts)
        if is_tabby_body(body):
            scope = {**scope, "path": TABBY_COMPLETIONS, "raw_path": TABBY_COMPLETIONS.encode()}
        replayed = False

        async def replay():  # the body once, then the client's own messages (a disconnect, for cancelling)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
