"""`POST /`: the prompt + history chat route of the DeepSeek-Coder FastAPI tutorial.

    {"prompt": "...", "history": [[user, assistant], ...], "max_length", "top_p", "temperature", ...}
    -> {"response", "history" (with this turn appended), "status": 200, "time": "YYYY-mm-dd HH:MM:SS"}

The history becomes chat messages laid out by the model's chat template; absent fields take the
tutorial server's defaults.
"""

from __future__ import annotations

import datetime
import uuid

from fastapi import APIRouter, Depends, Request

from ..engine import SamplingParams
from .generation import Generation
from .openai_routes import ERROR_RESPONSES
from .protocol import HistoryChatRequest, HistoryChatResponse
from .serving import Server, or_default
from .streaming import until_disconnected

# The tutorial server's defaults, used when a field is absent.
HISTORY_CHAT_DEFAULTS = {"max_length": 1024, "top_k": 5, "top_p": 0.7, "temperature": 0.95, "repetition_penalty": 1.1}


def router(server: Server) -> APIRouter:
    api = APIRouter(dependencies=[Depends(server.api_key_checker())], responses=ERROR_RESPONSES)

    @api.post("/", response_model=HistoryChatResponse, tags=["prompt + history chat"],
              summary="Chat with prompt + history (the DeepSeek-Coder FastAPI tutorial's API)")
    async def history_chat(body: HistoryChatRequest, request: Request):
        return await chat(server, body, request)

    return api


async def chat(server: Server, body: HistoryChatRequest, request: Request) -> HistoryChatResponse:
    history = body.history or []
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": body.prompt})
    prompt_ids = await server.chat_prompt(messages, param="prompt")
    max_new = min(server.fit_context(prompt_ids, None, "prompt"),
                  or_default(body.max_length, HISTORY_CHAT_DEFAULTS["max_length"]))
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=or_default(body.temperature, HISTORY_CHAT_DEFAULTS["temperature"]),
        top_k=or_default(body.top_k, HISTORY_CHAT_DEFAULTS["top_k"]),
        top_p=or_default(body.top_p, HISTORY_CHAT_DEFAULTS["top_p"]),
        repetition_penalty=or_default(body.repetition_penalty, HISTORY_CHAT_DEFAULTS["repetition_penalty"]),
    )
    server.validated(params, {"max_new_tokens": "max_length"})
    generation = Generation(server.engine, f"seed-{uuid.uuid4().hex}", [(prompt_ids, params)], server.metrics)
    try:
        await server.start(generation, "prompt")
        [out] = await until_disconnected(request, generation.results())
    finally:
        generation.close()
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return HistoryChatResponse(response=out.text, history=[*history, (body.prompt, out.text)], status=200, time=now)
