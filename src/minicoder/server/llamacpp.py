"""llama.cpp's `POST /infill`, as llama-server answers it, for llama.vim and llama.vscode.

    {"input_prefix": "def f():\\n", "input_suffix": "\\n", "prompt": "    ret", "input_extra": [{"filename", "text"}],
     "n_predict": 64, "top_k": 40, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"], "n_indent": 4,
     "t_max_predict_ms": 1500, "cache_prompt": true, "stream": false, "response_fields": ["content", ...]}
    -> {"content", "stop", "stop_type", "tokens_predicted", "tokens_evaluated", "tokens_cached", "truncated",
        "has_new_line", "prompt", "generation_settings", "timings": {prompt_n, prompt_ms, predicted_n, ...}}

The prompt is laid out as llama-server lays it (`PromptBuilder.infill`): repository context (`input_extra`,
and `--repo` snippets) first, then the model's FIM tokens around prefix + `prompt` and suffix, cut to fit
the context. `n_predict: 0` only computes the prompt (the editors' cache warm-up while the user types;
one token is generated and discarded, so the prompt's KV blocks are in the prefix cache). Like
llama-server: `t_max_predict_ms` ends the text once a line is complete and that time has passed since
the first token; `n_indent` ends it at the first later line indented less. `samplers` picks which of
minicoder's samplers run (`top_k`, `top_p`, `min_p`, `temperature`, `penalties`); the others llama.cpp
has (`infill`, `dry`, `typ_p`, `xtc`, ...) are not implemented, and `generation_settings.samplers`
says which ran. `cache_prompt` is accepted either way: the prefix cache is exact, so reusing it never
changes the output. `t_max_prompt_ms` is accepted and, as in llama-server, not enforced.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..engine import RequestOutput, SamplingParams
from .streaming import EventStream, stream_error, until_disconnected
from .errors import APIError
from .generation import Generation
from .protocol import ExtraFile, StrictModel, Text

SAMPLERS = ("penalties", "top_k", "top_p", "min_p", "temperature")  # the ones minicoder has
WARM_UP_TOKENS = 1  # n_predict 0: the engine samples once after the prompt; the token is dropped
DEFAULT_RESERVE = 256  # completion room kept when n_predict is -1 (as long as the context allows)


class InfillRequest(StrictModel):
    """Fields llama-server has and minicoder does not (`grammar`, `n_probs`, `lora`, `mirostat`...) are a 400."""

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [
        {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n", "prompt": "    return",
         "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}],
         "n_predict": 32, "temperature": 0}]}}

    input_prefix: Text = Field("", description="Code before the cursor's line.")
    input_suffix: Text = Field("", description="Code after the cursor.")
    prompt: Text = Field("", description="The cursor line's text before the cursor (appended to input_prefix).")
    input_extra: list[ExtraFile] = Field(default_factory=list, description="Other files (chunks) of the repository.")
    n_predict: int = Field(-1, ge=-1, description="Most tokens to generate; -1 = what fits; 0 = only compute the "
                           "prompt (cache warm-up).")
    temperature: float = Field(0.8, description="<= 0: greedy.")
    top_k: int = Field(40, description="<= 0: off.")
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0)
    frequency_penalty: float = Field(0.0)
    seed: int = Field(-1, description="-1 (or 4294967295): random.")
    stop: list[Text] = Field(default_factory=list)
    ignore_eos: bool = False
    samplers: list[str] | None = Field(None, description=f"Samplers to run, from {', '.join(SAMPLERS)}; default all.")
    stream: bool = False
    cache_prompt: bool = True
    t_max_prompt_ms: int = Field(-1, description="Accepted; not enforced (nor is it by llama-server).")
    t_max_predict_ms: int = Field(-1, description="After this long since the first token, end at the next line end.")
    n_indent: int = Field(0, ge=0, description="End the text at a later line indented less than this.")
    return_tokens: bool = Field(False, description="Include the generated token ids.")
    response_fields: list[str] | None = Field(None, description="Only these fields, nested ones as `timings/prompt_n`.")


class LineGuard:
    """llama-server's `n_indent` and `t_max_predict_ms` ends, applied to text as it streams: the
    whitespace starting a line is held until the line's indentation is known."""

    def __init__(self, n_indent: int, t_max_predict_ms: int):
        self.n_indent, self.t_max = n_indent, t_max_predict_ms / 1000 if t_max_predict_ms > 0 else None
        self.text = ""  # what the client gets
        self.pending = ""  # whitespace starting a line whose indentation is not known yet
        self.at_line_start = False  # the first line continues the cursor's line: it is never checked
        self.has_new_line = False
        self.ended = False  # ended by n_indent or the time limit

    def add(self, delta: str) -> str:
        """Take generated text; return the part that can be sent now."""
        sent = ""
        for ch in delta:
            if self.ended:
                break
            checking = self.n_indent and self.at_line_start
            if checking and ch in " \t":
                self.pending += ch
                continue
            if checking and ch != "\n" and len(self.pending) < self.n_indent:
                self.pending, self.ended = "", True  # this line and everything after it is dropped
                break
            sent += self.pending + ch
            self.pending = ""
            self.at_line_start = ch == "\n"
            self.has_new_line = self.has_new_line or ch == "\n"
        self.text += sent
        return sent

    def timed_out(self, first_token_at: float | None) -> bool:
        if self.t_max is None or not self.has_new_line or first_token_at is None or self.ended:
            return False
        if time.perf_counter() - first_token_at > self.t_max:
            self.ended = True
        return self.ended

    def finish(self) -> str:
        """The held whitespace, once the text ends on its own."""
        rest, self.pending = ("" if self.ended else self.pending), ""
        self.text += rest
        return rest


def pick_fields(body: dict, paths: list[str]) -> dict:
    """llama-server's `response_fields`: only the listed paths, nested keys flattened as "a/b"."""
    out = {}
    for path in paths:
        node: Any = body
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


def router(server) -> APIRouter:
    """The /infill route over `server` (serving.Server: engine, prompts, settings, limits)."""
    api = APIRouter(tags=["llama.cpp"], dependencies=[Depends(server.api_key_checker())])

    @api.post("/infill", summary="Fill in the middle (llama.cpp's server API, for llama.vim / llama.vscode)")
    async def infill(body: InfillRequest, request: Request):
        infill = await asyncio.to_thread(Infill, server, body)  # builds and tokenizes the prompt
        return await infill.run(request)

    return api


class Infill:
    def __init__(self, server, body: InfillRequest):
        self.server, self.body = server, body
        context = server.context
        reserve = body.n_predict if body.n_predict > 0 else WARM_UP_TOKENS if body.n_predict == 0 else \
            min(DEFAULT_RESERVE, context // 4)
        if reserve >= context:
            raise APIError(f"n_predict is {body.n_predict}, but this model's context holds {context} tokens",
                           param="n_predict", code="context_length_exceeded")
        files = [(f.filename, f.text) for f in body.input_extra]
        self.prompt = server.fim.prompt(body.input_prefix + body.prompt, body.input_suffix, files, reserve=reserve,
                                        param="input_prefix")
        n = len(self.prompt.ids)
        self.max_new = body.n_predict if body.n_predict > 0 else WARM_UP_TOKENS if body.n_predict == 0 else context - n
        self.samplers = [s for s in SAMPLERS if body.samplers is None or s in body.samplers]
        self.params = self.sampling_params()
        self.guard = LineGuard(body.n_indent, body.t_max_predict_ms)

    def sampling_params(self) -> SamplingParams:
        b, on = self.body, set(self.samplers)
        greedy = b.temperature <= 0
        params = SamplingParams(
            max_new_tokens=self.max_new,
            temperature=0.0 if greedy else b.temperature if "temperature" in on else 1.0,
            top_k=max(b.top_k, 0) if "top_k" in on else 0,
            top_p=b.top_p if "top_p" in on else 1.0,
            min_p=b.min_p if "min_p" in on else 0.0,
            repetition_penalty=b.repeat_penalty if "penalties" in on else 1.0,
            presence_penalty=b.presence_penalty if "penalties" in on else 0.0,
            frequency_penalty=b.frequency_penalty if "penalties" in on else 0.0,
            stop=list(b.stop), ignore_eos=b.ignore_eos,
            seed=None if b.seed in (-1, 0xFFFFFFFF) else b.seed % (1 << 64))
        try:
            params.validate()
        except ValueError as e:
            raise APIError(str(e), param=str(e).split()[0]) from None
        return params

    async def run(self, request: Request):
        generation = Generation(self.server.engine, f"infill-{uuid.uuid4().hex}", [(self.prompt.ids, self.params)],
                                self.server.metrics)
        await self.server.start(generation, "input_prefix")
        if self.body.stream:
            return EventStream(self.events(generation), on_close=generation.close)
        try:
            out = await until_disconnected(request, self.consume(generation))
        finally:
            generation.close()
        return self.respond(self.final_body(generation, out))

    async def consume(self, generation: Generation) -> RequestOutput | None:
        last = None
        async for _, out in generation.stream():
            last = out
            if self.body.n_predict == 0:  # warm-up: the one token is not part of any answer
                continue
            self.guard.add(out.delta_text)
            if self.guard.ended or self.guard.timed_out(self.first_token_at(generation, out)):
                break
        self.guard.finish()
        return last

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        last = None
        try:
            async for _, out in generation.stream():
                last = out
                text = self.guard.add(out.delta_text) if self.body.n_predict != 0 else ""
                stop_now = self.guard.ended or self.guard.timed_out(self.first_token_at(generation, out))
                if text:
                    yield "data: " + json.dumps({"index": 0, "content": text, "tokens": out.delta_token_ids
                                                 if self.body.return_tokens else [], "stop": False,
                                                 "tokens_predicted": out.completion_tokens,
                                                 "tokens_evaluated": len(self.prompt.ids)}) + "\n\n"
                if stop_now:
                    break
            rest = self.guard.finish()
            body = self.final_body(generation, last)
            body["content"] = rest  # the final event carries only what was still held back
            yield "data: " + json.dumps(self.filtered(body)) + "\n\n"
        except Exception as e:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            yield stream_error(generation, e)
        finally:
            generation.close()

    @staticmethod
    def first_token_at(generation: Generation, out: RequestOutput) -> float | None:
        ttft = out.time_to_first_token
        return None if ttft is None else generation.arrival + ttft

    def final_body(self, generation: Generation, out: RequestOutput | None) -> dict:
        b, now = self.body, time.perf_counter()
        warm_up = b.n_predict == 0
        prompt_n = len(self.prompt.ids)
        cached = out.cached_tokens if out is not None else 0
        predicted = 0 if warm_up or out is None else out.completion_tokens
        ttft = out.time_to_first_token if out is not None and out.time_to_first_token is not None else now - generation.arrival
        prompt_ms, predicted_ms = ttft * 1000, max(now - generation.arrival - ttft, 0.0) * 1000
        stop_type = "limit"  # n_predict reached, or ended by n_indent / t_max_predict_ms
        if not self.guard.ended and out is not None and out.finish_reason == "stop":
            eos = self.server.engine.eos_token_ids
            stop_type = "eos" if out.token_ids and out.token_ids[-1] in eos else "word"
        processed = prompt_n - cached
        return {
            "index": 0,
            "content": "" if warm_up else self.guard.text,
            "tokens": (out.token_ids if out is not None and not warm_up else []) if b.return_tokens else [],
            "stop": True,
            "model": self.server.settings.model_name,
            "tokens_predicted": predicted,
            "tokens_evaluated": prompt_n,
            "tokens_cached": cached,
            "truncated": self.prompt.truncated,
            "has_new_line": self.guard.has_new_line,
            "stop_type": stop_type,
            "prompt": self.server.tokenizer.decode(self.prompt.ids),
            "generation_settings": {
                "n_predict": b.n_predict, "temperature": self.params.temperature, "top_k": self.params.top_k,
                "top_p": self.params.top_p, "min_p": self.params.min_p, "repeat_penalty": b.repeat_penalty,
                "seed": b.seed, "stop": b.stop, "n_indent": b.n_indent, "t_max_predict_ms": b.t_max_predict_ms,
                "samplers": self.samplers, "input_extra_used": self.prompt.files_used},
            "timings": {
                "cache_n": cached,
                "prompt_n": processed, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / processed if processed else 0.0,
                "prompt_per_second": 1000 * processed / prompt_ms if prompt_ms else 0.0,
                "predicted_n": predicted, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
                "predicted_per_second": 1000 * predicted / predicted_ms if predicted_ms and predicted else 0.0},
        }

    def filtered(self, body: dict) -> dict:
        return pick_fields(body, self.body.response_fields) if self.body.response_fields else body

    def respond(self, body: dict) -> JSONResponse:
        return JSONResponse(self.filtered(body))
