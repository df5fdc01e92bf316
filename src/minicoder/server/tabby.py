"""Tabby's server API, for Tabby's editor agent (`tabby-agent`, VS Code / JetBrains / Vim plugins):

  GET  /v1/health        {model, chat_model, device, arch, cpu_info, cpu_count, cuda_devices, version}
  POST /v1/completions   {language, segments: {prefix, suffix, filepath, declarations, relevant_snippets_from_*,
                          clipboard}, temperature, seed} -> {id, choices: [{index, text}]}

(The OpenAI route shares the completions path; `clients.TabbyDispatch` tells the bodies apart.) Tabby's
snippets become repository context of the fill-in-the-middle prompt: recently opened files' snippets
first, then changed files' (by score), then declarations (nearest the code), and `--repo` snippets before
all of them. The completion is at most `max_tokens` (Tabby's own server default, 64) tokens.
"""

from __future__ import annotations

import os
import platform
import uuid

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from .. import __version__
from ..engine import SamplingParams
from .streaming import until_disconnected
from .clients import TABBY_COMPLETIONS
from .errors import APIError
from .generation import Generation
from .protocol import StrictModel, Text

MAX_TOKENS = 64  # Tabby's max_decoding_tokens default
DEFAULT_TEMPERATURE = 0.1  # what Tabby's server samples with when the agent sends none


class Snippet(StrictModel):
    filepath: Text = ""
    body: Text
    score: float | None = None


class Declaration(StrictModel):
    filepath: Text = ""
    body: Text


class Segments(StrictModel):
    prefix: Text
    suffix: Text | None = None
    filepath: Text | None = None
    git_url: str | None = Field(None, description="Accepted; the repository is the server's --repo, if any.")
    declarations: list[Declaration] | None = None
    relevant_snippets_from_changed_files: list[Snippet] | None = None
    relevant_snippets_from_recently_opened_files: list[Snippet] | None = None
    clipboard: Text | None = None


class TabbyCompletionRequest(StrictModel):
    language: str | None = Field(None, description="Accepted, not used: the path header written from "
                                 "segments.filepath tells the model the language.")
    segments: Segments
    user: str | None = Field(None, description="Accepted (Tabby's user id), not used.")
    temperature: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    max_tokens: int | None = Field(None, ge=1, description=f"Most tokens (default {MAX_TOKENS}).")


class TabbyChoice(BaseModel):
    index: int
    text: str


class TabbyCompletionResponse(BaseModel):
    id: str
    choices: list[TabbyChoice]


def context_files(segments: Segments) -> list[tuple[str, str]]:
    """Tabby's snippets as (path, text), least relevant first."""
    recent = segments.relevant_snippets_from_recently_opened_files or []
    changed = sorted(segments.relevant_snippets_from_changed_files or [], key=lambda s: s.score or 0.0)
    files = [(s.filepath, s.body) for s in [*recent, *changed]]
    if segments.clipboard:
        files.append(("", segments.clipboard))
    return files + [(d.filepath, d.body) for d in segments.declarations or []]


def router(server) -> APIRouter:
    api = APIRouter(tags=["tabby"], dependencies=[Depends(server.api_key_checker())])

    @api.get("/v1/health", summary="Tabby's health check: the served model")
    async def health() -> dict:
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        return {"model": server.settings.model_name, "chat_model": server.settings.model_name,
                "device": "cuda" if cuda else "cpu", "arch": platform.machine(),
                "cpu_info": platform.processor() or platform.machine(), "cpu_count": os.cpu_count() or 1,
                "cuda_devices": cuda, "version": {"git_describe": f"minicoder {__version__}"}}

    @api.post(TABBY_COMPLETIONS, response_model=TabbyCompletionResponse, summary="Tabby's code completion "
              "(also on POST /v1/completions)")
    async def completions(body: TabbyCompletionRequest, request: Request):
        seg = body.segments
        max_new = body.max_tokens or MAX_TOKENS
        prompt = await server.fim.aprompt(seg.prefix, seg.suffix or "", context_files(seg), seg.filepath,
                                   reserve=max_new, param="segments.prefix")
        max_new = server.fit_context(prompt.ids, max_new, "segments.prefix")
        temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=body.seed)
        generation = Generation(server.engine, f"cmpl-{uuid.uuid4().hex}", [(prompt.ids, params)], server.metrics)
        await server.start(generation, "segments.prefix")
        try:
            [out] = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        if out.finish_reason == "cancelled":
            raise APIError("the request was cancelled", status=499, code="client_closed_request")
        return TabbyCompletionResponse(id=generation.id, choices=[TabbyChoice(index=0, text=out.text)])

    return api
