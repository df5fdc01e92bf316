"""Ollama's API, for the `ollama` client and the editors and UIs that speak it (Continue, Zed, Open WebUI...):

  GET  /api/version, /api/tags, /api/ps      the server's version; the served model, as Ollama lists models
  POST /api/show                             {model} -> details, model_info, prompt template, capabilities
  POST /api/generate                         {model, prompt, suffix, system, raw, context, options, stream, keep_alive}
  POST /api/chat                             {model, messages, options, stream, keep_alive}

Streaming (the default, as in Ollama) sends NDJSON lines; the last has `done: true`, `done_reason`, the
token counts and the durations in nanoseconds. Errors are `{"error": "..."}` with Ollama's status codes.
The model is listed as `NAME:latest` and found by either name. `/api/generate` lays the prompt out with
the chat template (with `system`), unless `raw`; with `suffix` it fills in the middle with the model's
FIM tokens (and `--repo` context). Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9),
except `repeat_penalty` (default 1.0): minicoder's penalty covers every prompt and output token, so
`repeat_last_n` may only be -1 (that) or 0 (off). `num_ctx` lowers the context a request may use (above
the server's, the server's holds). Options that choose how Ollama loads a model (`num_thread`, `num_gpu`,
`use_mmap`, ...) and `keep_alive` are accepted and not applied: this server keeps its one model loaded
(`/api/ps` shows it never expiring) and its command line decides threads and devices. `format` ("json"
or a JSON schema) constrains the output as `response_format` does on the OpenAI routes. `images`,
`tools`, `think` and templates other than the model's are refused with a 400.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import Field, field_validator

from ..engine import RequestOutput, SamplingParams
from .streaming import EventStream, until_disconnected
from .errors import APIError, field_path
from .generation import Generation
from .protocol import StrictModel, Text
from .structured import checked, guided_from_ollama_format

API_VERSION = "0.12.0"  # the Ollama API version whose routes and fields this module follows
NEVER = "2318-01-01T00:00:00Z"  # /api/ps `expires_at` of a model that stays loaded (as Ollama shows keep_alive -1)
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
_DURATION = re.compile(r"^-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?$")


class OllamaRoute(APIRoute):
    """Errors as Ollama sends them: `{"error": "message"}` (the ollama client raises ResponseError with it)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
                param = field_path(tuple(first["loc"]))
                return JSONResponse({"error": f"{param}: {first['msg']}" if param else first["msg"]}, 400)
            except APIError as e:
                return JSONResponse({"error": e.message}, e.status, headers=e.headers)

        return route


class Options(StrictModel):
    model_config = {"extra": "forbid", "strict": True}

    num_predict: int | None = Field(None, ge=-2, description="-1 / -2: as many as fit.")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: list[Text] | Text | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = Field(None, ge=1)
    # how Ollama loads a model: accepted, not applied (the server's command line decides)
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    low_vram: bool | None = None
    numa: bool | None = None
    # samplers minicoder does not have: only their "off" values
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = Field(None, description="true (the penalty covers newlines) or absent.")

    @field_validator("typical_p", "tfs_z", "mirostat", "penalize_newline")
    @classmethod
    def _off(cls, v, info):
        off = {"typical_p": 1, "tfs_z": 1, "mirostat": 0, "penalize_newline": True}[info.field_name]
        if v is not None and v != off:
            raise ValueError(f"this server does not have this sampler; only {off} (off) is accepted")
        return v

    @field_validator("repeat_last_n")
    @classmethod
    def _window(cls, v):
        if v not in (None, -1, 0):
            raise ValueError("only -1 (all prompt and output tokens) or 0 (off) are supported")
        return v


class _OllamaRequest(StrictModel):
    model: str
    options: Options | None = None
    stream: bool = True
    keep_alive: str | int | float | None = Field(None, description="Accepted (validated), not applied: the model "
                                                 "stays loaded.")
    format: Any = Field(None, description='"json" or a JSON schema: the output is constrained to match.')
    think: bool | str | None = Field(None, description="Not supported: must be absent or false.")

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, v):
        if isinstance(v, str) and not _DURATION.match(v):
            raise ValueError('a duration such as "5m", "1h", "30s", "-1" or a number of seconds')
        return v


class GenerateRequest(_OllamaRequest):
    prompt: Text = ""
    suffix: Text | None = None
    system: Text | None = None
    template: Text | None = Field(None, description="Not supported: the model's own template is used.")
    raw: bool = False
    context: list[int] | None = Field(None, description="Token ids from an earlier response, put before the prompt.")
    images: list[str] | None = None


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: Text = ""
    images: list[str] | None = None


class ChatRequest(_OllamaRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict] | None = None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class ModelFacts:
    """What /api/tags, /api/show and /api/ps say about the model directory."""

    def __init__(self, path: Path, dtype: str, context: int, fim: bool):
        files = sorted(p for p in path.iterdir() if p.is_file())
        self.size = sum(p.stat().st_size for p in files)
        listing = "\n".join(f"{p.name}\t{p.stat().st_size}" for p in files)
        # identifies the directory's contents (names and sizes), not a registry manifest
        self.digest = hashlib.sha256(listing.encode()).hexdigest()
        self.modified_at = datetime.datetime.fromtimestamp(max((p.stat().st_mtime for p in files), default=0),
                                                           datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        self.family = config.get("model_type", "llama")
        self.parameters = sum(_safetensors_parameters(p) for p in files if p.suffix == ".safetensors")
        self.dtype = dtype
        self.context = context
        self.hidden_size = config.get("hidden_size")
        self.capabilities = ["completion", *(["insert"] if fim else [])]

    def details(self) -> dict:
        return {"parent_model": "", "format": "safetensors", "family": self.family, "families": [self.family],
                "parameter_size": _human(self.parameters), "quantization_level": self.dtype.upper().replace("FLOAT", "F")
                .replace("BFLOAT", "BF")}

    def model_info(self) -> dict:
        info = {"general.architecture": self.family, "general.parameter_count": self.parameters,
                f"{self.family}.context_length": self.context}
        if self.hidden_size:
            info[f"{self.family}.embedding_length"] = self.hidden_size
        return info


def _safetensors_parameters(path: Path) -> int:
    """Parameter count from a safetensors header (no tensor is read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def router(server) -> APIRouter:
    api = APIRouter(tags=["ollama"], route_class=OllamaRoute, dependencies=[Depends(server.api_key_checker())])
    ollama = Ollama(server)

    @api.get("/api/version", summary="The Ollama API version served")
    async def version() -> dict:
        return {"version": API_VERSION}

    @api.get("/api/tags", summary="Models (Ollama's API)")
    async def tags() -> dict:
        return {"models": [ollama.listing()]}

    @api.get("/api/ps", summary="Loaded models (Ollama's API)")
    async def ps() -> dict:
        return {"models": [{**ollama.listing(), "expires_at": NEVER, "size_vram": 0,
                            "context_length": server.context}]}

    @api.post("/api/show", summary="A model's details (Ollama's API)")
    async def show(body: dict) -> dict:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str):
            raise APIError("model is required", param="model")
        ollama.check_model(name)
        facts = ollama.facts
        return {"modelfile": f"# served by minicoder\nFROM {server.engine.model_path}\n", "parameters": "",
                "template": ollama.template(), "details": facts.details(),
                "model_info": facts.model_info(), "capabilities": facts.capabilities,
                "modified_at": facts.modified_at}

    @api.post("/api/generate", summary="Completion, fill-in-the-middle, or one chat turn (Ollama's API)")
    async def generate(body: GenerateRequest, request: Request):
        return await ollama.generate(body, request)

    @api.post("/api/chat", summary="Chat (Ollama's API)")
    async def chat(body: ChatRequest, request: Request):
        return await ollama.chat(body, request)

    return api


class Ollama:
    def __init__(self, server):
        self.server = server
        engine = server.engine
        dtype = str(engine.dtype).split(".")[-1]  # resolved at load (`auto` is bf16 or float32 by now)
        self.facts = ModelFacts(engine.model_path, dtype, server.context, server.prompts.fim_format is not None)

    def template(self) -> str:
        """The prompt layout, as an Ollama (Go) template: the fill-in-the-middle branch is exact (clients such
        as Continue look for `.Suffix` to know the model fills in the middle); chat prompts go through the
        model's Jinja chat template, which a Go template cannot hold, so that branch says so."""
        chat = ("{{/* not a Go template: the prompt goes through the model's Jinja chat template (GET "
                "/tokenizer_info shows it); raw: true sends it as is */}}{{ .Prompt }}")
        fmt = self.server.prompts.fim_format
        if fmt is None:
            return chat
        return (f"{{{{- if .Suffix }}}}{fmt.prefix}{{{{ .Prompt }}}}{fmt.suffix}{{{{ .Suffix }}}}{fmt.middle}"
                f"{{{{- else }}}}{chat}{{{{- end }}}}")

    @property
    def name(self) -> str:
        name = self.server.settings.model_name
        return name if ":" in name else f"{name}:latest"

    def listing(self) -> dict:
        f = self.facts
        return {"name": self.name, "model": self.name, "modified_at": f.modified_at, "size": f.size,
                "digest": f.digest, "details": f.details()}

    def check_model(self, name: str | None):
        if name not in (self.name, self.server.settings.model_name):
            raise APIError(f"model '{name}' not found", status=404)

    # --- requests ----------------------------------------------------------------------------------
    def check_common(self, body: _OllamaRequest):
        self.check_model(body.model)
        if body.think not in (None, False):
            raise APIError("think is not supported by this server", param="think")

    async def generate(self, body: GenerateRequest, request: Request):
        self.check_common(body)
        if body.images:
            raise APIError("images are not supported by this model", param="images")
        if body.template:
            raise APIError("template is not supported: the model's own chat template is used", param="template")
        if body.raw and (body.system or body.suffix is not None):
            raise APIError("raw prompts take no system or suffix", param="raw")
        if body.suffix is not None and body.system:
            raise APIError("system does not apply to fill-in-the-middle (suffix)", param="system")
        if not body.prompt and body.suffix is None and not body.context:
            return {"model": body.model, "created_at": now_iso(), "response": "", "done": True, "done_reason": "load"}
        opts = body.options or Options()
        context = min(opts.num_ctx or self.server.context, self.server.context)
        max_new = opts.num_predict if opts.num_predict and opts.num_predict > 0 else None
        if body.suffix is not None:
            reserve = max_new or min(256, context // 4)
            prompt_ids = (await self.server.fim.aprompt(body.prompt, body.suffix, reserve=reserve + self.server.context - context,
                                                       param="prompt", cut_code=False)).ids
        elif body.raw:
            self.server.check_prompt_size(len(body.prompt), "prompt", "characters")
            prompt_ids = await asyncio.to_thread(self.server.prompts.completion, body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                       [{"role": "user", "content": body.prompt}]
            prompt_ids = await self.server.chat_prompt(messages, param="prompt")
        prompt_ids = list(body.context or []) + prompt_ids
        return await self.run(body, opts, prompt_ids, context, max_new, request, chat=False)

    async def chat(self, body: ChatRequest, request: Request):
        self.check_common(body)
        if body.tools:
            raise APIError("tools are not supported by this server", param="tools")
        if any(m.images for m in body.messages):
            raise APIError("images are not supported by this model", param="messages")
        if not body.messages:
            return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        opts = body.options or Options()
        context = min(opts.num_ctx or self.server.context, self.server.context)
        max_new = opts.num_predict if opts.num_predict and opts.num_predict > 0 else None
        prompt_ids = await self.server.chat_prompt([{"role": m.role, "content": m.content} for m in body.messages],
                                             param="messages")
        return await self.run(body, opts, prompt_ids, context, max_new, request, chat=True)

    def sampling_params(self, opts: Options, max_new: int) -> SamplingParams:
        def opt(name):
            value = getattr(opts, name)
            return DEFAULTS.get(name) if value is None else value

        penalty = 1.0 if opts.repeat_last_n == 0 or opts.repeat_penalty is None else opts.repeat_penalty
        stop = [opts.stop] if isinstance(opts.stop, str) else list(opts.stop or [])
        params = SamplingParams(max_new_tokens=max_new, temperature=opt("temperature"), top_k=opt("top_k"),
                                top_p=opt("top_p"), min_p=opts.min_p or 0.0, repetition_penalty=penalty,
                                presence_penalty=opts.presence_penalty or 0.0,
                                frequency_penalty=opts.frequency_penalty or 0.0, stop=stop,
                                seed=None if opts.seed is None else opts.seed % (1 << 64))
        try:
            params.validate()
        except ValueError as e:
            raise APIError(f"options: {e}") from None
        return params

    async def run(self, body, opts: Options, prompt_ids: list[int], context: int, max_new: int | None,
                  request: Request, chat: bool):
        n = len(prompt_ids)
        if n >= context:
            raise APIError(f"the prompt has {n} tokens, but the context holds {context} tokens", param="prompt")
        if max_new is not None and n + max_new > context:
            raise APIError(f"options.num_predict is {max_new} and the prompt has {n} tokens, more than the {context} "
                           "tokens of the context", param="options.num_predict")
        params = self.sampling_params(opts, max_new or context - n)
        params.guided = await checked(self.server.engine, guided_from_ollama_format(body.format), param="format")
        generation = Generation(self.server.engine, f"ollama-{uuid.uuid4().hex}", [(prompt_ids, params)],
                                self.server.metrics)
        await self.server.start(generation, "prompt")
        if body.stream:
            return EventStream(self.lines(body.model, generation, prompt_ids, chat), on_close=generation.close,
                               media_type="application/x-ndjson")
        try:
            [out] = await until_disconnected(request, generation.results())
        finally:
            generation.close()
        return {**self.piece(body.model, out.text, chat), **self.final(generation, out, prompt_ids, chat)}

    async def lines(self, model: str, generation: Generation, prompt_ids: list[int], chat: bool) -> AsyncIterator[str]:
        try:
            last = None
            async for _, out in generation.stream():
                last = out
                if out.delta_text:
                    yield json.dumps({**self.piece(model, out.delta_text, chat), "done": False}) + "\n"
            yield json.dumps({**self.piece(model, "", chat), **self.final(generation, last, prompt_ids, chat)}) + "\n"
        except Exception as e:  # the engine failed mid-stream: say it in the stream, as Ollama does
            yield json.dumps({"error": f"generation failed: {type(e).__name__}: {e}"}) + "\n"
        finally:
            generation.close()

    @staticmethod
    def piece(model: str, text: str, chat: bool) -> dict:
        body = {"model": model, "created_at": now_iso()}
        return {**body, "message": {"role": "assistant", "content": text}} if chat else {**body, "response": text}

    @staticmethod
    def final(generation: Generation, out: RequestOutput, prompt_ids: list[int], chat: bool) -> dict:
        total = time.perf_counter() - generation.arrival
        ttft = out.time_to_first_token if out.time_to_first_token is not None else total
        body = {"done": True, "done_reason": {"stop": "stop", "length": "length"}.get(out.finish_reason, "stop"),
                "total_duration": int(total * 1e9), "load_duration": 0, "prompt_eval_count": out.prompt_tokens,
                "prompt_eval_duration": int(ttft * 1e9), "eval_count": out.completion_tokens,
                "eval_duration": int(max(total - ttft, 0) * 1e9)}
        if not chat:
            body["context"] = [*prompt_ids, *out.token_ids]
        return body
