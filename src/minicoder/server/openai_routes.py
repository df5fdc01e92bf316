"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions` (completion, fill-in-the-middle with
`suffix`, n, stop, seed, logprobs, echo, stream) and `POST /v1/chat/completions` (the model's chat template,
n, stop, seed, logprobs, stream, tools); both take `response_format` (constrained decoding: structured.py,
tool_calls.py). Request bodies become prompt token ids + `SamplingParams` through the shared
layer (serving.py); engine outputs become OpenAI JSON or server-sent event chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request

from ..engine import GuidedDecoding, RequestOutput
from ..engine import TokenLogprob as EngineLogprob
from .errors import APIError
from .generation import Generation
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, Delta, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage)
from .serving import Server, or_default, usage
from .streaming import EventStream, sse, stream_error, until_disconnected
from .structured import checked, guided_from_response_format
from .tool_calls import ToolCallDelta, ToolCallStream, ToolError, ToolPlan, render_messages

PROMPT_ONLY_TOKENS = 1  # max_tokens 0: the engine samples once after the prompt; the token is dropped
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
        # echo + logprobs: the prompt tokens' logprobs too (what evaluation harnesses score log-likelihoods by)
        echo_logprobs = bool(body.echo) and body.logprobs is not None
        prompt_only = body.max_tokens == 0
        if prompt_only and not body.echo:
            raise APIError("max_tokens 0 needs echo: true (it returns the prompt only)", param="max_tokens")
        if echo_logprobs and body.suffix is not None:
            raise APIError("echo with logprobs scores plain prompts, not fill-in-the-middle ones (suffix)",
                           param="echo", code="unsupported")
        count = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and \
            not isinstance(body.prompt[0], int) else 1
        server.check_choices(count * n)  # before tokenizing any of the prompts
        guided = await checked(server.engine, guided_from_response_format(body.response_format))
        prompts = await asyncio.to_thread(server.completion_prompts, body)  # tokenizing off the event loop
        requests, groups, echoes = [], [], []
        for p, (text, prompt_ids) in enumerate(prompts):
            max_new = server.fit_context(prompt_ids, body.max_tokens, "prompt")
            if body.max_tokens is None:
                max_new = min(max_new, server.settings.completion_max_tokens)
            max_new = max_new or PROMPT_ONLY_TOKENS
            for _ in range(n):
                seed = choice_seed(body.seed, len(requests))
                requests.append((prompt_ids, server.sampling_params(body, max_new, seed, body.logprobs,
                                                                    body.logprobs if echo_logprobs else None, guided)))
                groups.append(p)
                echoes.append(text if body.echo else "")
        generation = Generation(server.engine, f"cmpl-{uuid.uuid4().hex}", requests, server.metrics, groups)
        await server.start(generation, "prompt")
        created = int(time.time())
        shape = CompletionShape(echoes, body.logprobs, echo_logprobs, prompt_only)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.completion_events(generation, created, shape, include_usage),
                               on_close=generation.close)
        try:
            outputs = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        choices = [CompletionChoice(index=i, text=echoes[i] + ("" if prompt_only else out.text),
                                    finish_reason="length" if prompt_only else FINISH_REASONS[out.finish_reason],
                                    logprobs=self.choice_logprobs(*shape.logprob_entries(generation, i, out, prompt=True,
                                                                                         whole=True), len(echoes[i]))
                                    if body.logprobs is not None else None)
                   for i, out in enumerate(outputs)]
        return CompletionResponse(id=generation.id, created=created, model=server.settings.model_name, choices=choices,
                                  usage=shape.usage(generation))

    async def completion_events(self, generation: Generation, created: int, shape: "CompletionShape",
                                include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage_: Usage | None = None) -> str:
            return sse(CompletionResponse(id=generation.id, created=created, model=self.server.settings.model_name,
                                          choices=choices, usage=usage_))

        echoes = list(shape.echoes)  # each choice's echo goes out with its first chunk
        offsets = [len(e) for e in echoes]  # text_offset of each choice's next generated token
        first = [True] * len(echoes)
        try:
            async for i, out in generation.stream():
                text = "" if shape.prompt_only else out.delta_text
                if echoes[i]:
                    text, echoes[i] = echoes[i] + text, ""
                lps = None
                prompt_entries, generated = shape.logprob_entries(generation, i, out, prompt=first[i], whole=False)
                first[i] = False
                if shape.logprobs is not None and (prompt_entries or generated):
                    lps = self.choice_logprobs(prompt_entries, generated, offsets[i])
                    offsets[i] += sum(self.server.token_width(token_id) for token_id, _ in generated)
                finish = None
                if out.finished:
                    finish = "length" if shape.prompt_only else FINISH_REASONS[out.finish_reason]
                if text or lps or finish:
                    yield chunk([CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=finish)])
            if include_usage:
                yield chunk([], shape.usage(generation))
        except Exception as e:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            yield stream_error(generation, e)
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    # --- POST /v1/chat/completions -----------------------------------------------------------------
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        server = self.server
        server.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        plan, guided = await self.chat_constraints(body)
        prompt_ids = await server.chat_prompt(render_messages(body.messages, plan), param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = server.fit_context(prompt_ids, max_tokens, "messages", param)
        n = or_default(body.n, 1)
        logprobs = or_default(body.top_logprobs, 0) if body.logprobs else None
        requests = [(prompt_ids, server.sampling_params(body, max_new, choice_seed(body.seed, i), logprobs,
                                                        guided=guided))
                    for i in range(n)]
        generation = Generation(server.engine, f"chatcmpl-{uuid.uuid4().hex}", requests, server.metrics, [0] * n)
        await server.start(generation, "messages")
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.chat_events(generation, created, n, logprobs is not None, include_usage, plan),
                               on_close=generation.close)
        try:
            outputs = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        choices = []
        for i, out in enumerate(outputs):
            content, calls = plan.parse(out.text) if plan is not None else (out.text, [])
            choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls or None),
                                      finish_reason=chat_finish_reason(out.finish_reason, calls),
                                      logprobs=self.chat_logprobs(out.logprobs) if logprobs is not None else None))
        return ChatCompletionResponse(id=generation.id, created=created, model=server.settings.model_name,
                                      choices=choices, usage=usage(generation))

    async def chat_events(self, generation: Generation, created: int, n: int, logprobs: bool,
                          include_usage: bool, plan: ToolPlan | None = None) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage_: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=generation.id, created=created, model=self.server.settings.model_name,
                                           choices=choices, usage=usage_))

        calls_streams = [ToolCallStream(plan) for _ in range(n)] if plan is not None else None
        try:
            for i in range(n):
                yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            async for i, out in generation.stream():
                lps = self.chat_logprobs(out.delta_logprobs) if logprobs and out.delta_logprobs else None
                text = calls_streams[i].feed(out.delta_text) if calls_streams else out.delta_text
                if text or lps:
                    yield chunk([ChatChunkChoice(index=i, delta=Delta(content=text), logprobs=lps)])
                if out.finished:
                    calls = []
                    if calls_streams:  # what was held back: the calls, or text that turned out not to be one
                        rest, calls = calls_streams[i].finish()
                        if rest:
                            yield chunk([ChatChunkChoice(index=i, delta=Delta(content=rest))])
                        if calls:
                            deltas = [ToolCallDelta(index=k, id=c.id, function=c.function) for k, c in enumerate(calls)]
                            yield chunk([ChatChunkChoice(index=i, delta=Delta(tool_calls=deltas))])
                    finish = chat_finish_reason(out.finish_reason, calls)
                    yield chunk([ChatChunkChoice(index=i, delta=Delta(), finish_reason=finish)])
            if include_usage:
                yield chunk([], usage(generation))
        except Exception as e:
            yield stream_error(generation, e)
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    async def chat_constraints(self, body: ChatCompletionRequest) -> tuple[ToolPlan | None, GuidedDecoding | None]:
        """The request's tool plan and output constraint (tool calls or response_format); 400s name the field."""
        try:
            plan = ToolPlan.from_request(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ToolError as e:
            raise APIError(str(e), param=e.param) from None
        tool_guided = plan.guided() if plan is not None else None
        format_guided = guided_from_response_format(body.response_format)
        if plan is not None and plan.mode != "none" and format_guided is not None:
            raise APIError("response_format cannot be combined with tools (unless tool_choice is \"none\")",
                           param="response_format")
        if tool_guided is not None:
            return plan, await checked(self.server.engine, tool_guided, param="tools")
        return plan, await checked(self.server.engine, format_guided)

    # --- outputs -----------------------------------------------------------------------------------
    def choice_logprobs(self, prompt_entries: list[tuple[int, EngineLogprob | None]],
                        generated: list[tuple[int, EngineLogprob]], offset: int) -> CompletionLogprobs:
        """The echoed prompt's tokens (offsets from 0, the start of the echoed text), then the generated ones
        (offsets from `offset`, where the generated text starts)."""
        prompt, new = self.completion_logprobs(prompt_entries, 0), self.completion_logprobs(generated, offset)
        return CompletionLogprobs(**{field: getattr(prompt, field) + getattr(new, field)
                                     for field in CompletionLogprobs.model_fields})

    def completion_logprobs(self, entries: list[tuple[int, EngineLogprob | None]], offset: int) -> CompletionLogprobs:
        """(token id, its logprob or None) -> the legacy completions format, text offsets from `offset`."""
        token_text, token_width = self.server.token_text, self.server.token_width
        tokens, offsets, chosen, tops = [], [], [], []
        for token_id, lp in entries:
            tokens.append(token_text(token_id))
            offsets.append(offset)
            offset += token_width(token_id)
            chosen.append(None if lp is None else lp.logprob)
            # Most likely first: of tokens that decode alike (pieces of one UTF-8 character) the likeliest stays.
            tops.append(None if lp is None else {token_text(t): v for t, v in reversed(lp.top)})
        return CompletionLogprobs(tokens=tokens, token_logprobs=chosen, text_offset=offsets, top_logprobs=tops)

    def chat_logprobs(self, logprobs: list[EngineLogprob] | None) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.server.token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChatLogprobs(content=[TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                                                  top_logprobs=[top(t, v) for t, v in lp.top])
                                     for lp in logprobs or []])


@dataclass
class CompletionShape:
    """What a completions response holds besides the generated text: each choice's echoed prompt, logprobs
    (of the prompt too with echo), or the prompt only (max_tokens 0)."""

    echoes: list[str]
    logprobs: int | None
    echo_logprobs: bool
    prompt_only: bool

    def logprob_entries(self, generation: Generation, index: int, out: RequestOutput, *, prompt: bool,
                        whole: bool) -> tuple[list[tuple[int, EngineLogprob | None]], list[tuple[int, EngineLogprob]]]:
        """(token id, logprob) pairs of choice `index`: its prompt's (when `prompt` and echo asks for them),
        and the generated tokens of `out`: all of them (`whole`), or the new ones (a stream's chunk)."""
        prompt_entries, generated = [], []
        if prompt and self.echo_logprobs:
            prompt_ids = generation.requests[index][0]
            prompt_entries = list(zip(prompt_ids, out.prompt_logprobs or [None] * len(prompt_ids)))
        if not self.prompt_only:
            generated = [(lp.token_id, lp) for lp in (out.logprobs if whole else out.delta_logprobs) or []]
        return prompt_entries, generated

    def usage(self, generation: Generation) -> Usage:
        counts = usage(generation)
        if self.prompt_only:  # the one token the engine sampled after the prompt is dropped
            counts.completion_tokens, counts.total_tokens = 0, counts.prompt_tokens
        return counts


def chat_finish_reason(reason: str, calls: list) -> str:
    return "tool_calls" if calls and reason == "stop" else FINISH_REASONS[reason]


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (as a 64-bit seed), so choices differ yet repeat."""
    return None if seed is None else (seed + index) % (1 << 64)
