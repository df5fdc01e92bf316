"""The HTTP server: OpenAI-compatible routes, the prompt + history chat route (`POST /`), health and metrics.

    engine = AsyncEngine.from_pretrained("runs/sft/final")
    app = create_app(engine, ServerSettings(model_name="final"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `minicoder serve MODEL` does

Every route generates through the engine (docs/ARCHITECTURE.md principle 3); this module turns HTTP requests into
prompt token ids + `SamplingParams`, and engine outputs into JSON or server-sent events:

  GET  /, /ui/...             the web UI (browsers), the server's description (JSON); see ui_routes.py
  POST /                      prompt + history chat (the DeepSeek-Coder FastAPI tutorial's API): {"prompt", "history"} -> {"response", "history", "status", "time"}
  GET  /v1/models             the served model
  POST /v1/completions        completion, fill-in-the-middle (`suffix`), n, stop, seed, logprobs, echo, stream
  POST /v1/chat/completions   chat through the model's chat template, n, stop, seed, logprobs, stream
  GET  /health, GET /metrics  liveness; Prometheus text
  + the editor and harness APIs (llama.cpp /infill, Ollama /api/*, Tabby, vLLM /tokenize): server/clients.py
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..engine import AsyncEngine, QueueFull, SamplingParams
from ..engine import TokenLogprob as EngineLogprob
from .cli import configure_serve_parser, run_serve  # noqa: F401  (`minicoder serve`, re-exported)
from .clients import fim_context, include_client_routers
from .errors import APIError, install_error_handlers, log_internal_error
from .generation import Generation
from .limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from .metrics import ServerMetrics
from .ui_routes import install_ui
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, Delta, ErrorResponse, ModelCard, ModelList, PromptTokensDetails,
                       SamplingFields, HistoryChatRequest, HistoryChatResponse, TokenLogprob, TopLogprob, Usage)

log = logging.getLogger("minicoder.server")

T = TypeVar("T")

# The tutorial server's defaults, used when a field is absent.
HISTORY_CHAT_DEFAULTS = {"max_length": 1024, "top_k": 5, "top_p": 0.7, "temperature": 0.95, "repetition_penalty": 1.1}
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}
ENGINE_TO_API_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429)}


@dataclass
class ServerSettings:
    model_name: str = "minicoder"  # the name clients send as `model` (and /v1/models lists)
    api_key: str | None = None  # when set, every route but /health and /metrics needs `Authorization: Bearer KEY`
    completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default); chat: what fits
    repo: str | None = None  # a repository to index: its most relevant snippets go into fill-in-the-middle prompts
    repo_context_tokens: int = 1024  # most prompt tokens those snippets take
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before they are read


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app over `engine`. The app owns the engine: it is closed when the app shuts down."""
    settings = settings or ServerSettings()
    server = _Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sampler = asyncio.create_task(server.sample_metrics())
        try:
            yield
        finally:
            sampler.cancel()
            server.fim.close()
            await engine.close()

    # With an API key the schema is served behind it, and the HTML docs (which a browser cannot load
    # with a bearer header) are off.
    open_docs = settings.api_key is None
    app = FastAPI(title="minicoder", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if open_docs else None, redoc_url="/redoc" if open_docs else None,
                  openapi_url="/openapi.json" if open_docs else None,
                  description="A code LLM behind an OpenAI-compatible API, editor and harness APIs, and the prompt + history chat route.")
    app.state.server = server
    install_ui(app)  # GET /: the web UI for browsers, this server's description as JSON otherwise
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.include_router(server.open_routes())
    app.include_router(server.generation_routes())
    include_client_routers(app, server)
    if not open_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(server.api_key_checker())])
        async def openapi() -> dict:
            return app.openapi()
    return app


class _Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.prompts = engine.engine.prompts
        self.tokenizer = engine.engine.tokenizer
        self.context = engine.engine.max_request_tokens  # prompt + completion tokens of one request
        # No token is longer than the longest vocabulary entry (in characters, bytes for byte-level BPE),
        # so a prompt of more characters than this cannot fit and is refused without tokenizing it; the
        # factor 2 leaves room for normalizers that merge characters.
        self.max_prompt_chars = 2 * self.context * max(map(len, self.prompts.vocab), default=1)
        self.started = int(time.time())
        self._token_text: dict[int, str] = {}
        self.fim = fim_context(self.prompts, self.context, settings, self.max_prompt_chars)

    # --- routes ------------------------------------------------------------------------------------
    def open_routes(self) -> APIRouter:
        router = APIRouter(tags=["monitoring"])

        @router.get("/health", summary="Liveness")
        async def health() -> dict:
            return {"status": "ok"}

        @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.render(self.engine.engine.stats()),
                                     media_type="text/plain; version=0.0.4; charset=utf-8")

        return router

    def generation_routes(self) -> APIRouter:
        router = APIRouter(dependencies=[Depends(self.api_key_checker())], responses=ERROR_RESPONSES)

        @router.post("/", response_model=HistoryChatResponse, tags=["prompt + history chat"], summary="Chat with prompt + history (the DeepSeek-Coder FastAPI tutorial's API)")
        async def history_chat(body: HistoryChatRequest, request: Request):
            return await self.history_chat(body, request)

        @router.get("/v1/models", response_model=ModelList, tags=["openai"])
        async def models():
            return ModelList(data=[ModelCard(id=self.settings.model_name, created=self.started,
                                             max_model_len=self.context)])

        @router.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
                     summary="Completion and fill-in-the-middle")
        async def completions(body: CompletionRequest, request: Request):
            return await self.completions(body, request)

        @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"],
                     summary="Chat")
        async def chat_completions(body: ChatCompletionRequest, request: Request):
            return await self.chat_completions(body, request)

        return router

    def api_key_checker(self) -> Callable:
        bearer = HTTPBearer(auto_error=False, description="The server's --api-key.")
        key = self.settings.api_key

        async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
            if key is None:
                return
            if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
                raise APIError("missing or wrong API key: send the header `Authorization: Bearer KEY`", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

        return check

    # --- POST / (prompt + history chat) -------------------------------------------------------------------------
    async def history_chat(self, body: HistoryChatRequest, request: Request) -> HistoryChatResponse:
        history = body.history or []
        messages = []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": body.prompt})
        prompt_ids = await self.chat_prompt(messages, param="prompt")
        max_new = min(self.fit_context(prompt_ids, None, "prompt"),
                      _or(body.max_length, HISTORY_CHAT_DEFAULTS["max_length"]))
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=_or(body.temperature, HISTORY_CHAT_DEFAULTS["temperature"]),
            top_k=_or(body.top_k, HISTORY_CHAT_DEFAULTS["top_k"]),
            top_p=_or(body.top_p, HISTORY_CHAT_DEFAULTS["top_p"]),
            repetition_penalty=_or(body.repetition_penalty, HISTORY_CHAT_DEFAULTS["repetition_penalty"]),
        )
        self.validated(params, {"max_new_tokens": "max_length"})
        generation = Generation(self.engine, f"seed-{uuid.uuid4().hex}", [(prompt_ids, params)], self.metrics)
        try:
            await self.start(generation, "prompt")
            [out] = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return HistoryChatResponse(response=out.text, history=[*history, (body.prompt, out.text)], status=200, time=now)

    # --- POST /v1/completions ----------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        n = _or(body.n, 1)
        if body.best_of is not None and body.best_of != n:
            raise APIError("best_of must equal n (or be absent)", param="best_of", code="unsupported")
        if body.echo and body.logprobs is not None:
            raise APIError("echo with logprobs needs prompt log-probabilities, which this server does not compute",
                           param="echo", code="unsupported")
        count = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and \
            not isinstance(body.prompt[0], int) else 1
        self.check_choices(count * n)  # before tokenizing any of the prompts
        prompts = await asyncio.to_thread(self.completion_prompts, body)  # tokenizing off the event loop
        requests, groups, echoes = [], [], []
        for p, (text, prompt_ids) in enumerate(prompts):
            max_new = self.fit_context(prompt_ids, body.max_tokens, "prompt")
            if body.max_tokens is None:
                max_new = min(max_new, self.settings.completion_max_tokens)
            for _ in range(n):
                seed = choice_seed(body.seed, len(requests))
                requests.append((prompt_ids, self.sampling_params(body, max_new, seed, body.logprobs)))
                groups.append(p)
                echoes.append(text if body.echo else "")
        generation = Generation(self.engine, f"cmpl-{uuid.uuid4().hex}", requests, self.metrics, groups)
        await self.start(generation, "prompt")
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
        return CompletionResponse(id=generation.id, created=created, model=self.settings.model_name, choices=choices,
                                  usage=usage(generation))

    async def completion_events(self, generation: Generation, created: int, echoes: list[str],
                                logprobs: int | None, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage_: Usage | None = None) -> str:
            return sse(CompletionResponse(id=generation.id, created=created, model=self.settings.model_name,
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
        self.check_model(body.model)
        if body.tools:
            raise APIError("tools are not supported by this server", param="tools", code="unsupported")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt_ids = await self.chat_prompt(messages, param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = self.fit_context(prompt_ids, max_tokens, "messages", param)
        n = _or(body.n, 1)
        logprobs = _or(body.top_logprobs, 0) if body.logprobs else None
        requests = [(prompt_ids, self.sampling_params(body, max_new, choice_seed(body.seed, i), logprobs))
                    for i in range(n)]
        generation = Generation(self.engine, f"chatcmpl-{uuid.uuid4().hex}", requests, self.metrics, [0] * n)
        await self.start(generation, "messages")
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
        return ChatCompletionResponse(id=generation.id, created=created, model=self.settings.model_name,
                                      choices=choices, usage=usage(generation))

    async def chat_events(self, generation: Generation, created: int, n: int, logprobs: bool,
                          include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage_: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=generation.id, created=created, model=self.settings.model_name,
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

    # --- prompts and parameters --------------------------------------------------------------------
    def check_model(self, name: str | None):
        if name is not None and name != self.settings.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", status=404, code="model_not_found")

    def completion_prompts(self, body: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt."""
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError("the prompt list is empty", param="prompt")
        for prompt in prompts:
            if isinstance(prompt, str):
                self.check_prompt_size(len(prompt) + len(body.suffix or ""), "prompt", "characters")
            else:
                self.check_prompt_size(len(prompt), "prompt", "tokens")
                self.check_prompt_size(len(body.suffix or ""), "suffix", "characters")
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                text = prompt
            else:
                vocab_size = self.engine.engine.vocab_size
                if any(t >= vocab_size for t in prompt):
                    raise APIError(f"prompt token ids must be below the vocabulary size {vocab_size}", param="prompt")
                text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            if body.suffix is not None:
                files = [(f.filename, f.text) for f in body.input_extra or []]
                reserve = _or(body.max_tokens, self.settings.completion_max_tokens)
                out.append((text, self.fim.prompt(text, body.suffix, files, reserve=reserve, cut_code=False).ids))
            elif body.input_extra:
                raise APIError("input_extra needs suffix (it is context for fill-in-the-middle)", param="input_extra")
            else:
                out.append((text, self.prompts.completion(prompt) if isinstance(prompt, str) else list(prompt)))
        return out

    async def chat_prompt(self, messages: list[dict], param: str) -> list[int]:
        """The chat prompt's token ids, laid out and tokenized off the event loop (after a size check)."""
        self.check_prompt_size(sum(len(m["content"]) for m in messages), param, "characters")
        try:
            return await asyncio.to_thread(self.prompts.chat, messages)
        except Exception as e:  # jinja2 raises TemplateError (`raise_exception` in templates), others ValueError
            raise APIError(f"the model's chat template rejected the messages: {e}", param=param) from None

    def check_prompt_size(self, size: int, param: str, unit: str):
        """Refuse a prompt that cannot fit the context before spending time tokenizing it."""
        limit = self.context if unit == "tokens" else self.max_prompt_chars
        if size > limit:
            raise APIError(f"the prompt has {size} {unit}, more than this model's context of {self.context} "
                           f"tokens can hold (at most {limit} {unit})", param=param, code="context_length_exceeded")

    def fit_context(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str,
                    max_tokens_param: str = "max_tokens") -> int:
        """The new-token budget: `max_tokens`, or what fits when it is None. Errors name the field at fault."""
        n, context = len(prompt_ids), self.context
        if n >= context:
            raise APIError(f"the prompt has {n} tokens, but this model's context holds {context} tokens "
                           "(prompt and completion together)", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return context - n
        if n + max_tokens > context:
            raise APIError(f"{max_tokens_param} is {max_tokens} and the prompt has {n} tokens, more than the "
                           f"{context} tokens of this model's context", param=max_tokens_param,
                           code="context_length_exceeded")
        return max_tokens

    def sampling_params(self, body: SamplingFields, max_new_tokens: int, seed: int | None,
                        logprobs: int | None) -> SamplingParams:
        if body.logit_bias:
            raise APIError("logit_bias is not supported by this server", param="logit_bias", code="unsupported")
        temperature = _or(body.temperature, 1.0)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,  # a tiny one is greedy: SamplingParams.greedy
            top_k=max(_or(body.top_k, 0), 0),
            top_p=_or(body.top_p, 1.0),
            min_p=_or(body.min_p, 0.0),
            repetition_penalty=_or(body.repetition_penalty, 1.0),
            presence_penalty=_or(body.presence_penalty, 0.0),
            frequency_penalty=_or(body.frequency_penalty, 0.0),
            min_new_tokens=_or(body.min_tokens, 0),
            ignore_eos=bool(body.ignore_eos),
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            logprobs=logprobs,
            seed=seed,
        )
        return self.validated(params)

    def validated(self, params: SamplingParams, api_names: dict[str, str] = ENGINE_TO_API_FIELDS) -> SamplingParams:
        """`params`, or a 400 naming the request field the engine would refuse (checked against the model)."""
        try:
            params.validate(self.engine.engine.vocab_size)
        except ValueError as e:
            message = str(e)
            for engine_name, api_name in api_names.items():
                message = message.replace(engine_name, api_name)
            raise APIError(message, param=message.split()[0]) from None
        return params

    def check_choices(self, count: int):
        max_waiting = self.engine.engine.config.max_waiting
        if count > max_waiting:
            raise APIError(f"{count} choices (n x prompts) are more than this server queues at once ({max_waiting})",
                           param="n")

    async def start(self, generation: Generation, prompt_param: str):
        """Submit a generation: a full queue is a 429, a request the engine refuses a 400."""
        self.check_choices(len(generation.requests))
        try:
            await generation.start()
        except QueueFull as e:
            self.metrics.requests["rejected"] += len(generation.requests)
            log.warning("%s: rejected, the queue is full (%s)", generation.id, e)
            raise APIError(f"the server is busy ({e}); retry later", status=429, type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(str(e), param=prompt_param) from None

    # --- outputs -----------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion_logprobs(self, logprobs: list[EngineLogprob] | None, offset: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        for lp in logprobs or []:
            tokens.append(self.token_text(lp.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs or []], text_offset=offsets,
            top_logprobs=[{self.token_text(t): v for t, v in lp.top} for lp in logprobs or []])

    def chat_logprobs(self, logprobs: list[EngineLogprob] | None) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChatLogprobs(content=[TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                                                  top_logprobs=[top(t, v) for t, v in lp.top])
                                     for lp in logprobs or []])

    async def sample_metrics(self):
        while True:
            self.metrics.sample(self.engine.engine.generated_tokens)
            await asyncio.sleep(1.0)


# --- helpers -------------------------------------------------------------------------------------------
def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (as a 64-bit seed), so choices differ yet repeat."""
    return None if seed is None else (seed + index) % (1 << 64)


def usage(generation: Generation) -> Usage:
    prompt, completion, cached = generation.usage()
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


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
