"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions` (completion, fill-in-the-middle with
`suffix`, n, stop, seed, logprobs, echo, stream) and `POST /v1/chat/completions` (the model's chat template,
n, stop, seed, logprobs, stream). Request bodies become prompt token ids + `SamplingParams` through the shared
layer (serving.py); engine outputs become OpenAI JSON or server-sent event chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from ..engine import TokenLogprob as EngineLogprob
from .errors import APIError
from .generation import Generation
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, Delta, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage)
from .serving import Server, or_default, usage
from .streaming import EventStream, sse, stream_error, until_disconnected

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429)}


def router(server: Server) -> APIRouter:
    routes = OpenAIRoutes(server)
    api = APIRouter(dependencies=[Depends(server.api_key_checker())], responses=ERROR_RESPONSES, tags=["openai"])

    @api.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=server.settings.model_name, created=server.started,
                                         max_model_len=server.context)])

    @api.post("/v1/completions", response_model=CompletionResponse, summary="Completion and fill-in-the-middle")
    async def completions(body: CompletionRequest, request: Request):
        return await routes.completions(body, request)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, summary="Chat")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await routes.chat_completions(body, request)

    return api


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.server = server

    # --- POST /v1/completions ----------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        server = self.server
        server.check_model(body.model)
        n = or_default(body.n, 1)
        if body.best_of is not None and body.best_of != n:
            raise APIError("best_of must equal n (or be absent)", param="best_of", code="unsupported")
        if body.echo and body.logprobs is not None:
            raise APIError("echo with logprobs needs prompt log-probabilities, which this server does not compute",
                           param="echo", code="unsupported")
        count = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and \
            not isinstance(body.prompt[0], int) else 1
        server.check_choices(count * n)  # before tokenizing any of the prompts
        prompts = await asyncio.to_thread(self.completion_prompts, body)  # tokenizing off the event loop
        requests, groups, echoes = [], [], []
        for p, (text, prompt_ids) in enumerate(prompts):
            max_new = server.fit_context(prompt_ids, body.max_tokens, "prompt")
            if body.max_tokens is None:
                max_new = min(max_new, server.settings.completion_max_tokens)
            for _ in range(n):
                seed = choice_seed(body.seed, len(requests))
                requests.append((prompt_ids, server.sampling_params(body, max_new, seed, body.logprobs)))
                groups.append(p)
                echoes.append(text if body.echo else "")
        generation = Generation(server.engine, f"cmpl-{uuid.uuid4().hex}", requests, server.metrics, groups)
        await server.start(generation, "prompt")
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.completion_events(generation, created, echoes, body.logprobs, include_usage),
                               on_close=generation.close)
        try:
            outputs = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        choices = [CompletionChoice(index=i, text=echoes[i] + out.text, finish_reason=FINISH_REASONS[out.finish_reason],
                                    logprobs=self.completion_logprobs(out.logprobs, len(echoes[i]))
                                    if body.logprobs is not None else None)
                   for i, out in enumerate(outputs)]
        return CompletionResponse(id=generation.id, created=created, model=server.settings.model_name, choices=choices,
                                  usage=usage(generation))

    async def completion_events(self, generation: Generation, created: int, echoes: list[str],
                                logprobs: int | None, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage_: Usage | None = None) -> str:
            return sse(CompletionResponse(id=generation.id, created=created, model=self.server.settings.model_name,
                                          choices=choices, usage=usage_))

        offsets = [len(e) for e in echoes]  # text_offset of each choice's next token
        try:
            async for i, out in generation.stream():
                text = out.delta_text
                if echoes[i]:
                    text, echoes[i] = echoes[i] + text, ""
                lps = None
                if logprobs is not None and out.delta_logprobs:
                    lps = self.completion_logprobs(out.delta_logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lps.tokens)
                finish = FINISH_REASONS[out.finish_reason] if out.finished else None
                if text or lps or finish:
                    yield chunk([CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=finish)])
            if include_usage:
                yield chunk([], usage(generation))
        except Exception as e:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            yield stream_error(generation, e)
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    # --- POST /v1/chat/completions -----------------------------------------------------------------
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        server = self.server
        server.check_model(body.model)
        if body.tools:
            raise APIError("tools are not supported by this server", param="tools", code="unsupported")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt_ids = await server.chat_prompt(messages, param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = server.fit_context(prompt_ids, max_tokens, "messages", param)
        n = or_default(body.n, 1)
        logprobs = or_default(body.top_logprobs, 0) if body.logprobs else None
        requests = [(prompt_ids, server.sampling_params(body, max_new, choice_seed(body.seed, i), logprobs))
                    for i in range(n)]
        generation = Generation(server.engine, f"chatcmpl-{uuid.uuid4().hex}", requests, server.metrics, [0] * n)
        await server.start(generation, "messages")
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.chat_events(generation, created, n, logprobs is not None, include_usage),
                               on_close=generation.close)
        try:
            outputs = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        choices = [ChatChoice(index=i, message=AssistantMessage(content=out.text),
                              finish_reason=FINISH_REASONS[out.finish_reason],
                              logprobs=self.chat_logprobs(out.logprobs) if logprobs is not None else None)
                   for i, out in enumerate(outputs)]
        return ChatCompletionResponse(id=generation.id, created=created, model=server.settings.model_name,
                                      choices=choices, usage=usage(generation))

    async def chat_events(self, generation: Generation, created: int, n: int, logprobs: bool,
                          include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage_: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=generation.id, created=created, model=self.server.settings.model_name,
                                           choices=choices, usage=usage_))

        try:
            for i in range(n):
                yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            async for i, out in generation.stream():
                lps = self.chat_logprobs(out.delta_logprobs) if logprobs and out.delta_logprobs else None
                if out.delta_text or lps:
                    yield chunk([ChatChunkChoice(index=i, delta=Delta(content=out.delta_text), logprobs=lps)])
                if out.finished:
                    finish = FINISH_REASONS[out.finish_reason]
                    yield chunk([ChatChunkChoice(index=i, delta=Delta(), finish_reason=finish)])
            if include_usage:
                yield chunk([], usage(generation))
        except Exception as e:
            yield stream_error(generation, e)
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    # --- prompts -----------------------------------------------------------------------------------
    def completion_prompts(self, body: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt."""
        server = self.server
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError("the prompt list is empty", param="prompt")
        for prompt in prompts:
            if isinstance(prompt, str):
                server.check_prompt_size(len(prompt) + len(body.suffix or ""), "prompt", "characters")
            else:
                server.check_prompt_size(len(prompt), "prompt", "tokens")
                server.check_prompt_size(len(body.suffix or ""), "suffix", "characters")
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                text = prompt
            else:
                vocab_size = server.engine.vocab_size
                if any(t >= vocab_size for t in prompt):
                    raise APIError(f"prompt token ids must be below the vocabulary size {vocab_size}", param="prompt")
                text = server.tokenizer.decode(prompt, skip_special_tokens=True)
            if body.suffix is not None:
                files = [(f.filename, f.text) for f in body.input_extra or []]
                reserve = or_default(body.max_tokens, server.settings.completion_max_tokens)
                out.append((text, server.fim.prompt(text, body.suffix, files, reserve=reserve, cut_code=False).ids))
            elif body.input_extra:
                raise APIError("input_extra needs suffix (it is context for fill-in-the-middle)", param="input_extra")
            else:
                out.append((text, server.prompts.completion(prompt) if isinstance(prompt, str) else list(prompt)))
        return out

    # --- outputs -----------------------------------------------------------------------------------
    def completion_logprobs(self, logprobs: list[EngineLogprob] | None, offset: int) -> CompletionLogprobs:
        token_text = self.server.token_text
        tokens, offsets = [], []
        for lp in logprobs or []:
            tokens.append(token_text(lp.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs or []], text_offset=offsets,
            top_logprobs=[{token_text(t): v for t, v in lp.top} for lp in logprobs or []])

    def chat_logprobs(self, logprobs: list[EngineLogprob] | None) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.server.token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChatLogprobs(content=[TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                                                  top_logprobs=[top(t, v) for t, v in lp.top])
                                     for lp in logprobs or []])


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (as a 64-bit seed), so choices differ yet repeat."""
    return None if seed is None else (seed + index) % (1 << 64)
