"""The shared generation layer every API family's routes use: the served model's facts, prompt building and
size checks, request fields -> `SamplingParams`, submitting a `Generation` (429 when the queue is full),
token texts for log-probabilities, and the API key check.

    server = Server(engine, ServerSettings(model_name="final"))
    prompt_ids = await server.chat_prompt(messages, param="messages")
    params = server.sampling_params(body, server.fit_context(prompt_ids, body.max_tokens, "messages"), seed, None)
    generation = Generation(server.engine, "chatcmpl-1", [(prompt_ids, params)], server.metrics)
    await server.start(generation, "messages")
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..engine import AsyncEngine, GuidedDecoding, QueueFull, SamplingParams
from .clients import fim_context
from .errors import APIError
from .generation import Generation
from .limits import DEFAULT_MAX_BODY_BYTES
from .metrics import ServerMetrics
from .protocol import CompletionRequest, PromptTokensDetails, SamplingFields, Usage

log = logging.getLogger("minicoder.server")

T = TypeVar("T")

ENGINE_TO_API_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass
class ServerSettings:
    model_name: str = "minicoder"  # the name clients send as `model` (and /v1/models lists)
    api_key: str | None = None  # when set, every route but /health and /metrics needs `Authorization: Bearer KEY`
    completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default); chat: what fits
    repo: str | None = None  # a repository to index: its most relevant snippets go into fill-in-the-middle prompts
    repo_context_tokens: int = 1024  # most prompt tokens those snippets take
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before they are read


class Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.prompts = engine.prompts
        self.tokenizer = engine.tokenizer
        self.context = engine.max_request_tokens  # prompt + completion tokens of one request
        # No token is longer than the longest vocabulary entry (in characters, bytes for byte-level BPE),
        # so a prompt of more characters than this cannot fit and is refused without tokenizing it; the
        # factor 2 leaves room for normalizers that merge characters.
        self.max_prompt_chars = 2 * self.context * max(map(len, self.prompts.vocab), default=1)
        self.started = int(time.time())
        self._token_text: dict[int, str] = {}
        self._token_width: dict[int, int] = {}
        self.fim = fim_context(self.prompts, self.context, settings, self.max_prompt_chars)

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

    # --- prompts and parameters --------------------------------------------------------------------
    def check_model(self, name: str | None):
        if name is not None and name != self.settings.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", status=404, code="model_not_found")

    def completion_prompts(self, body: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of a completions request (text or token ids, FIM with `suffix`)."""
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
                vocab_size = self.engine.vocab_size
                if any(t >= vocab_size for t in prompt):
                    raise APIError(f"prompt token ids must be below the vocabulary size {vocab_size}", param="prompt")
                text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            if body.suffix is not None:
                files = [(f.filename, f.text) for f in body.input_extra or []]
                reserve = or_default(body.max_tokens, self.settings.completion_max_tokens)
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
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        guided: GuidedDecoding | None = None) -> SamplingParams:
        if body.logit_bias:
            raise APIError("logit_bias is not supported by this server", param="logit_bias", code="unsupported")
        temperature = or_default(body.temperature, 1.0)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,  # a tiny one is greedy: SamplingParams.greedy
            top_k=max(or_default(body.top_k, 0), 0),
            top_p=or_default(body.top_p, 1.0),
            min_p=or_default(body.min_p, 0.0),
            repetition_penalty=or_default(body.repetition_penalty, 1.0),
            presence_penalty=or_default(body.presence_penalty, 0.0),
            frequency_penalty=or_default(body.frequency_penalty, 0.0),
            min_new_tokens=or_default(body.min_tokens, 0),
            ignore_eos=bool(body.ignore_eos),
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            seed=seed,
            guided=guided,
        )
        return self.validated(params)

    def validated(self, params: SamplingParams, api_names: dict[str, str] = ENGINE_TO_API_FIELDS) -> SamplingParams:
        """`params`, or a 400 naming the request field the engine would refuse (checked against the model)."""
        try:
            params.validate(self.engine.vocab_size)
        except ValueError as e:
            message = str(e)
            for engine_name, api_name in api_names.items():
                message = message.replace(engine_name, api_name)
            raise APIError(message, param=message.split()[0]) from None
        return params

    def check_choices(self, count: int):
        max_waiting = self.engine.config.max_waiting
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

    def token_width(self, token_id: int) -> int:
        """How many characters the token adds to generated or echoed text (special tokens add none)."""
        width = self._token_width.get(token_id)
        if width is None:
            width = self._token_width[token_id] = len(self.tokenizer.decode([token_id], skip_special_tokens=True))
        return width

    async def sample_metrics(self):
        while True:
            self.metrics.sample(self.engine.generated_tokens)
            await asyncio.sleep(1.0)


def or_default(value: T | None, default: T) -> T:
    return default if value is None else value


def usage(generation: Generation) -> Usage:
    prompt, completion, cached = generation.usage()
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
