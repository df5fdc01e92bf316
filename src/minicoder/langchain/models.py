"""`MinicoderLLM` (a LangChain `LLM`) and `ChatMinicoder` (a `BaseChatModel`).

Each is built from `model="path/to/model_dir"` (the engine in-process, loaded once per process and shared
by every instance) or from `base_url="http://host:port/v1"` (a running `minicoder serve`, or any
OpenAI-compatible server; then `model` is the served model's name, default: the first one it lists).

    llm = MinicoderLLM(model="runs/demo/sft/final")
    llm.invoke("Write a function that reverses a string.")
    chat = ChatMinicoder(base_url="http://127.0.0.1:8000/v1")
    for chunk in chat.stream("Write hello world in Python"): print(chunk.content, end="")

Sampling defaults are the seed tutorial's (max new tokens 512, top_k 5, top_p 0.8, temperature 0.3,
repetition_penalty 1.1); each can be set on the instance or per call (`llm.invoke(x, temperature=0)`).
Unknown per-call arguments are refused, never dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import (ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk,
                                    LLMResult)
from langchain_core.runnables import RunnableConfig
from langchain_core.utils import secret_from_env
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..engine import SamplingParams
from .backends import Chunk, LocalBackend, Prompt, RemoteBackend, join_chunks, local_backend

# Per-call keyword arguments -> SamplingParams fields (max_tokens is LangChain's standard name).
SAMPLING_ARGS = {"max_new_tokens": "max_new_tokens", "max_tokens": "max_new_tokens", "temperature": "temperature",
                 "top_k": "top_k", "top_p": "top_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}


class MinicoderParams(BaseModel):
    """What both classes share: where the model is, how to sample, how to call it."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """A model directory (in-process engine), or with `base_url` the served model's name."""
    base_url: str | None = None
    """An OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (`minicoder serve`)."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("MINICODER_API_KEY", default=None))
    """The server's key (default: $MINICODER_API_KEY); only with `base_url`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype of the in-process engine; only with a model directory."""
    max_new_tokens: int = Field(512, alias="max_tokens", ge=1)
    temperature: float = Field(0.3, ge=0)
    top_k: int = Field(5, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: int | None = None
    """Same seed, same text (in-process: in any batch)."""
    stop: list[str] | None = None
    """Stop sequences for every call (a call's `stop` is added to these)."""
    timeout: float | None = Field(None, gt=0)
    """Seconds one request may take: the HTTP timeout, or in-process the generation's (then TimeoutError)."""
    max_retries: int = Field(2, ge=0)
    """Retries of a request the server answered 429 / failed transiently, or in-process one refused because the
    engine's waiting queue was full."""

    @model_validator(mode="after")
    def _check_source(self):
        if self.model is None and self.base_url is None:
            raise ValueError("pass model='path/to/model_dir' (in-process) or base_url='http://host:port/v1'")
        if self.base_url is None:
            if not Path(self.model).is_dir():
                raise ValueError(f"model={self.model!r} is not a model directory (to use a server, pass base_url)")
            if self.api_key is not None and "api_key" in self.model_fields_set:
                raise ValueError("api_key is for a server (base_url); an in-process model needs none")
        elif "dtype" in self.model_fields_set:
            raise ValueError("dtype is for an in-process model; the server chose its own")
        return self

    @cached_property
    def _backend(self) -> LocalBackend | RemoteBackend:
        if self.base_url is None:
            return local_backend(self.model, self.dtype)
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return RemoteBackend(self.base_url, key, self.model, self.timeout, self.max_retries)

    def warm_up(self):
        """Load the in-process model now (it loads on first use otherwise)."""
        return self._backend

    @property
    def model_name(self) -> str:
        return self._backend.model_name

    def _sampling(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[SamplingParams, str | None]:
        """The call's SamplingParams and its model override; unknown arguments raise."""
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        unknown = sorted(set(kwargs) - set(SAMPLING_ARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported argument(s): {', '.join(unknown)} "
                            f"(supported: {', '.join(SAMPLING_ARGS)}, stop, model)")
        if model is not None and self.base_url is None and model != self.model:
            raise ValueError("a per-call model= needs a server (base_url); this instance runs "
                             f"{self.model!r} in-process")
        fields = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                  "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed}
        fields.update({SAMPLING_ARGS[k]: v for k, v in kwargs.items()})
        params = SamplingParams(**fields, stop=[*(self.stop or []), *(stop or [])])
        params.validate()
        return params, (model if self.base_url is not None else None)

    def _stream_chunks(self, prompt: Prompt, stop, kwargs) -> Iterator[Chunk]:
        params, model = self._sampling(stop, kwargs)
        if isinstance(self._backend, LocalBackend):
            return self._backend.stream(prompt, params, self.timeout, self.max_retries)
        return self._backend.stream(prompt, params, model)

    def _astream_chunks(self, prompt: Prompt, stop, kwargs) -> AsyncIterator[Chunk]:
        params, model = self._sampling(stop, kwargs)
        if isinstance(self._backend, LocalBackend):
            return self._backend.astream(prompt, params, self.timeout, self.max_retries)
        return self._backend.astream(prompt, params, model)

    def _complete_many(self, prompts: list[Prompt], stop, kwargs) -> list[Chunk]:
        params, model = self._sampling(stop, kwargs)
        if isinstance(self._backend, LocalBackend):
            return self._backend.complete_many(prompts, params, self.timeout, self.max_retries)
        return self._backend.complete_many(prompts, params, model)

    async def _acomplete(self, prompt: Prompt, stop, kwargs) -> Chunk:
        if isinstance(self._backend, RemoteBackend):
            params, model = self._sampling(stop, kwargs)
            return await self._backend.acomplete(prompt, params, model)
        return join_chunks([c async for c in self._astream_chunks(prompt, stop, kwargs)])

    @property
    def _identifying_params(self) -> dict[str, Any]:
        where = {"model": self.model} if self.base_url is None else {"base_url": self.base_url, "model": self.model}
        return {**where, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                "stop": self.stop}

    def _ls_params(self, model_type: str, stop, kwargs) -> LangSmithParams:
        params = LangSmithParams(ls_provider="minicoder", ls_model_type=model_type,
                                 ls_model_name=kwargs.get("model") or self.model or self.base_url,
                                 ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens",
                                                                                   self.max_new_tokens)))
        if stop or self.stop:
            params["ls_stop"] = [*(self.stop or []), *(stop or [])]
        return params


def _usage(chunk: Chunk) -> dict[str, int]:
    return {"input_tokens": chunk.prompt_tokens, "output_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


# --- the completion LLM ------------------------------------------------------------------------------
class MinicoderLLM(MinicoderParams, LLM):
    """Text in, text out. `mode` says how the text reaches the model: "completion" continues it as written
    (code completion), "chat" sends it as one user turn of the chat template (the seed tutorial's class
    does this for its instruct model), "auto" picks chat for an in-process SFT model (minicoder.json says
    stage "sft") and completion otherwise."""

    mode: Literal["auto", "completion", "chat"] = "auto"

    @property
    def _llm_type(self) -> str:
        return "minicoder"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "mode": self.mode}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    @cached_property
    def _chat_mode(self) -> bool:
        if self.mode != "auto":
            return self.mode == "chat"
        if self.base_url is not None:
            return False
        from ..chat import pick_mode

        return pick_mode(Path(self.model), self._backend.engine.tokenizer)[0] == "chat"

    def _prompt(self, text: str) -> Prompt:
        return [{"role": "user", "content": text}] if self._chat_mode else text

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              **kwargs: Any) -> str:
        return self._complete_many([self._prompt(prompt)], stop, kwargs)[0].text

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        """Every prompt of a `batch` in flight at once (in-process: one engine batch)."""
        replies = self._complete_many([self._prompt(p) for p in prompts], stop, kwargs)
        return self._result(replies)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        import asyncio

        replies = await asyncio.gather(*(self._acomplete(self._prompt(p), stop, kwargs) for p in prompts))
        return self._result(list(replies))

    def _result(self, replies: list[Chunk]) -> LLMResult:
        generations = [[Generation(text=r.text, generation_info={"finish_reason": r.finish_reason,
                                                                 "usage": _usage(r)})] for r in replies]
        usage = {"prompt_tokens": sum(r.prompt_tokens for r in replies),
                 "completion_tokens": sum(r.completion_tokens for r in replies)}
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        for piece in self._stream_chunks(self._prompt(prompt), stop, kwargs):
            chunk = _generation_chunk(piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for piece in self._astream_chunks(self._prompt(prompt), stop, kwargs):
            chunk = _generation_chunk(piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _generation_chunk(piece: Chunk) -> GenerationChunk:
    info = {"finish_reason": piece.finish_reason, "usage": _usage(piece)} if piece.last else None
    return GenerationChunk(text=piece.text, generation_info=info)


# --- the chat model -----------------------------------------------------------------------------------
ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def to_chat_messages(messages: list[BaseMessage]) -> list[dict]:
    """LangChain messages -> the role/content dicts of the chat template and the OpenAI API (text only)."""
    out = []
    for message in messages:
        role = message.role if message.type == "chat" else ROLES.get(message.type)
        if role not in ("system", "user", "assistant", "developer"):
            raise ValueError(f"{message.type} messages are not supported (no tool calling): send system, human "
                             "and ai messages")
        if not isinstance(message.content, str) and any(
                not isinstance(b, str) and b.get("type") != "text" for b in message.content):
            raise ValueError("only text content is supported (this is a text-only code model)")
        entry = {"role": "system" if role == "developer" else role, "content": message.text}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


class ChatMinicoder(MinicoderParams, BaseChatModel):
    """Messages in, an AIMessage out, through the model's chat template; usage metadata on every reply."""

    streaming: bool = False
    """Generate through the streaming path even on invoke (callbacks get every token)."""

    @property
    def _llm_type(self) -> str:
        return "minicoder-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _message(self, reply: Chunk) -> AIMessage:
        return AIMessage(content=reply.text, usage_metadata=_usage(reply),
                         response_metadata={"finish_reason": reply.finish_reason, "model_name": self.model_name,
                                            "model_provider": "minicoder"})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        reply = self._complete_many([to_chat_messages(messages)], stop, kwargs)[0]
        return ChatResult(generations=[ChatGeneration(message=self._message(reply))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        reply = await self._acomplete(to_chat_messages(messages), stop, kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._message(reply))])

    def _message_chunk(self, piece: Chunk) -> ChatGenerationChunk:
        if not piece.last:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        message = self._message(piece)
        return ChatGenerationChunk(message=AIMessageChunk(content=piece.text, usage_metadata=message.usage_metadata,
                                                          response_metadata=message.response_metadata,
                                                          chunk_position="last"))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for piece in self._stream_chunks(to_chat_messages(messages), stop, kwargs):
            chunk = self._message_chunk(piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for piece in self._astream_chunks(to_chat_messages(messages), stop, kwargs):
            chunk = self._message_chunk(piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    def batch(self, inputs: list, config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list:
        """All inputs in flight at once (LangChain's default caps threads at the CPU count), so the engine
        steps them as one batch; a `max_concurrency` in the config still wins."""
        configs = config if isinstance(config, list) else [config or {}] * len(inputs)
        configs = [{**c, "max_concurrency": c.get("max_concurrency") or max(len(inputs), 1)} for c in configs]
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)
