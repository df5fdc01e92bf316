"""The engine: the one place that generates (CLI chat, server, LangChain, agent and evaluator call it).

    engine = Engine("checkpoints/sft")
    rid = engine.submit("def hello_world():", SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.delta_text, end="")

`run_to_completion(prompts)` runs a batch to the end and `stream(prompt)` yields one request's outputs,
both stepping the engine in the calling thread; `AsyncEngine.stream` is the asyncio version.

`submit` and `cancel` are safe to call from other threads while one thread runs `step` (that is how
`AsyncEngine` serves many clients). Each step: the scheduler picks the chunks, the runner computes their
logits in one batched forward, the sampler picks tokens, and each request turns its tokens into text.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MinicoderError
from .guided import Grammars
from .loading import compile_decode, eos_token_ids, load_model, load_tokenizer
from .options import DEFAULT_BATCHED_TOKENS
from .kv_cache import KVCacheManager, PrefixCacheStats
from .prompts import PromptBuilder
from .request import Request, RequestFailed, RequestOutput
from .sampler import record_prompt_logprobs, sample, token_logprob
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .runner import SequenceChunk
from .speculation import NgramProposer, SpeculationStats, SpeculativeConfig, verify

__all__ = ["Engine", "EngineConfig", "EngineStats", "QueueFull"]

log = logging.getLogger("minicoder.engine")



class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later (the server answers HTTP 429 with Retry-After)."""


@dataclass
class EngineConfig:
    dtype: torch.dtype | str = torch.float32  # or its name: "bfloat16"; "auto": bf16 where the hardware runs it natively
    compile: str = "off"  # "auto": torch.compile the decode step when it works; "on": or fail; "off": eager
    backend: str = "auto"  # "native" (paged Llama), "transformers", or "auto": native when it can load the model
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # default: what kv_cache_bytes holds, at most what max_num_seqs full contexts need
    kv_cache_bytes: int = 2 << 30
    max_num_seqs: int = 16  # requests in the running batch
    max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS  # tokens per step: decodes plus prefill chunks
    max_waiting: int = 256  # bound of the waiting queue: beyond it submit raises QueueFull
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    quantize: str | None = None  # "int8" / "int4": round-to-nearest weights at load time (native backend)
    kv_cache_dtype: str = "auto"  # "int8" / "int4": quantized KV cache, 2x / 4x the tokens per byte of 16-bit
    speculative: SpeculativeConfig | None = None  # prompt-lookup drafts, greedy and sampled requests (native backend)


@dataclass
class EngineStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    preemptions: int
    generated_tokens: int
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    kv_cache_dtype: str = "auto"
    kv_cache_bytes_per_token: int = 0
    block_size: int = 16
    speculation: SpeculationStats | None = None  # with speculative decoding on


class Engine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model_path = Path(model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptBuilder(self.tokenizer)
        loaded = load_model(self.model_path, config)
        self.backend, self.runner, self.vocab_size = loaded.backend, loaded.runner, loaded.vocab_size
        self.dtype, self.dtype_reason = loaded.dtype, loaded.dtype_reason
        self.compile_status = compile_decode(self.runner, self.backend, config.compile)
        self.kv_bytes_per_token = loaded.kv_bytes_per_token
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        prefix_caching = config.enable_prefix_caching and self.backend == "native"
        self.kv = KVCacheManager(loaded.num_blocks, config.block_size, prefix_caching)
        # A request must fit the KV pool on its own, or preempting the others would not let it finish.
        self.max_request_tokens = min(self.max_model_len, loaded.num_blocks * config.block_size)
        proposer = None
        if config.speculative is not None:
            if self.backend != "native":
                raise MinicoderError(f"{model_path}: speculative decoding needs the native backend (a Llama-family model)")
            proposer = NgramProposer(config.speculative).propose
        self.speculation = SpeculationStats()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, proposer)
        self.requests: dict[str, Request] = {}
        self.generated_tokens = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the inbox, filled by other threads, drained by step()
        self._new: list[Request] = []
        self._cancelled: list[str] = []

    # --- requests -------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        """Queue a request (text is encoded as `tokenizer.encode` does); returns its id. Raises QueueFull."""
        params = params or SamplingParams()
        params.validate(self.vocab_size)  # a value the sampler cannot honour is refused here, not mid-batch
        prompt_ids = self.prompts.completion(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_request_tokens:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; at most {self.max_request_tokens - 1} fit "
                             f"(context {self.max_model_len}, KV cache {len(self.kv.blocks) * self.kv.block_size})")
        if not all(0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        grammar = self.grammars.state(params.guided) if params.guided is not None else None  # ValueError if bad
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, params, tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                          eos_token_ids=self.eos_token_ids, max_total_tokens=self.max_request_tokens,
                          grammar=grammar)
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is in use")
            if len(self.scheduler.waiting) + len(self._new) >= self.config.max_waiting:
                raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
            self.requests[request_id] = request
            self._new.append(request)
        return request_id

    def cancel(self, request_id: str):
        """Stop a request: at the next step its blocks are freed and its final output (finish_reason
        "cancelled") is sent."""
        with self._lock:
            self._cancelled.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return an output for every request that changed.

        A failure that belongs to one request (its forward chunk, its sampling, its detokenization) fails
        that request alone (finish_reason "error") and the rest of the batch goes on.
        """
        outputs = self._take_inbox()
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        chunks, sequences, logits = self._forward(chunks, outputs)
        if any(s.all_logits for s in sequences):
            logits = self._take_prompt_logprobs(chunks, sequences, logits, outputs)
            chunks = [c for c in chunks if not c.request.finished]  # failed there: already removed
        self.scheduler.after_step(chunks)
        sampling, drafting, row = [], [], 0
        for chunk in chunks:  # the runner's rows: one per sampling chunk, 1 + drafts for a speculating one
            n = 1 + len(chunk.draft_token_ids) if chunk.draft_token_ids else int(chunk.samples)
            if chunk.request.finished:  # ended during this step (cancelled, failed): its rows are skipped
                pass
            elif chunk.draft_token_ids:
                drafting.append((chunk, logits[row : row + n]))
            elif chunk.samples:
                sampling.append((chunk.request, row))
            row += n
        if sampling:
            picked = [r for _, r in sampling]
            rows = logits if picked == list(range(len(logits))) else logits[picked]
            tokens = self._sample(rows, [request for request, _ in sampling])
            for (request, _), token in zip(sampling, tokens):
                if token is None:
                    outputs.append(self._fail(request, "sampling failed"))
                else:
                    self._emit(request, [token], outputs)
        for chunk, rows in drafting:
            self._verify(chunk, rows, outputs)
        return outputs

    def _emit(self, request: Request, tokens: list[int], outputs: list[RequestOutput], rows=None):
        """Append the request's new tokens (their logprobs from `rows` if given) until it finishes; one
        output for all of them."""
        delta, appended = "", []
        for i, token in enumerate(tokens):
            if rows is not None and request.logprobs is not None:
                request.logprobs.append(token_logprob(rows[i], token, request.params.logprobs))
            try:
                delta += request.append_token(token)
            except Exception:
                log.exception("request %s: decoding token %d failed", request.id, token)
                outputs.append(self._fail(request, "decoding failed"))
                return
            appended.append(token)
            self.generated_tokens += 1
            if request.finished:
                break
        outputs.append(request.output(delta, appended))
        if request.finished:
            self._remove(request)

    def _verify(self, chunk, rows: torch.Tensor, outputs: list[RequestOutput]):
        """Keep the drafts the request's own greedy or sampled choice agrees with, plus its next token (speculation.py)."""
        request, draft = chunk.request, chunk.draft_token_ids
        try:
            tokens, accepted = verify(rows, draft, request)
        except Exception:
            log.exception("request %s: verifying %d draft tokens failed", request.id, len(draft))
            outputs.append(self._fail(request, "sampling failed"))
            return
        self.speculation.record(len(draft), accepted)
        request.record_drafts(len(draft), accepted)
        self._emit(request, tokens, outputs, rows)
        if not request.finished:  # all `accepted` drafts were appended: their keys/values are valid
            self.scheduler.accept_drafts(request, accepted)

    def _forward(self, chunks: list, outputs: list[RequestOutput]) -> tuple[list, list[SequenceChunk], torch.Tensor]:
        """Logits for `chunks` in one batched forward (as runner.forward orders them); if that raises, each
        chunk alone, failing the requests whose chunk raises again (the paged cache's K/V writes are simply
        redone by the retries). Returns the chunks that ran, what the runner was given for them, the logits."""
        sequences = [self._sequence_chunk(c) for c in chunks]
        try:
            return chunks, sequences, self.runner.forward(sequences)
        except Exception:
            log.exception("a batched forward of %d chunks failed; retrying them one by one", len(chunks))
        kept, kept_sequences, rows = [], [], []
        for chunk, sequence in zip(chunks, sequences):
            if self.backend == "transformers":  # its per-request cache may hold part of the failed step:
                self.runner.release(chunk.request.id)  # recompute the request from its first token
                r = chunk.request
                sequence = SequenceChunk(r.id, r.token_ids[: chunk.start + chunk.num_tokens], 0, sequence.block_table,
                                         chunk.samples, sequence.all_logits)
            try:
                row = self.runner.forward([sequence])
            except Exception:
                log.exception("request %s: forward failed", chunk.request.id)
                outputs.append(self._fail(chunk.request, "the model's forward pass failed"))
                continue
            kept.append(chunk)
            kept_sequences.append(sequence)
            if len(row):
                rows.append(row)
        return kept, kept_sequences, torch.cat(rows) if rows else torch.empty(0)

    def _take_prompt_logprobs(self, chunks: list, sequences: list[SequenceChunk], logits: torch.Tensor,
                              outputs: list[RequestOutput]) -> torch.Tensor:
        """Record the prompt logprobs of the chunks that returned every row; the rows that sample stay."""
        sample_rows, row = [], 0
        for chunk, sequence in zip(chunks, sequences):
            n = len(sequence.token_ids) if sequence.all_logits else \
                (1 + sequence.num_draft if sequence.wants_logits else 0)
            if sequence.all_logits:
                try:
                    record_prompt_logprobs(chunk.request, sequence.start, logits[row : row + n])
                except Exception:
                    log.exception("request %s: prompt logprobs failed", chunk.request.id)
                    outputs.append(self._fail(chunk.request, "computing prompt logprobs failed"))
            if sequence.wants_logits and not chunk.request.finished:
                sample_rows += [row + n - 1] if sequence.all_logits else range(row, row + n)
            row += n
        return logits[sample_rows]

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int | None]:
        """One token per request; a request whose sampling raises gets None. The others are resampled
        alone from the generator states they had before the failed batch, so their tokens are the same."""
        kept_logprobs = [None if r.logprobs is None else len(r.logprobs) for r in requests]
        kept_states = [None if r.generator is None else r.generator.get_state() for r in requests]
        try:
            return sample(logits, requests)
        except Exception:
            log.exception("batched sampling of %d requests failed; sampling them one by one", len(requests))
        for request, n, state in zip(requests, kept_logprobs, kept_states):  # undo what the failed batch did
            if n is not None:
                del request.logprobs[n:]
            if state is not None:
                request.generator.set_state(state)
        tokens: list[int | None] = []
        for i, request in enumerate(requests):
            try:
                tokens += sample(logits[i : i + 1], [request])
            except Exception:
                log.exception("request %s: sampling failed", request.id)
                tokens.append(None)
        return tokens

    def _sequence_chunk(self, c) -> SequenceChunk:
        tokens = c.request.token_ids[c.start : c.start + c.num_tokens] + c.draft_token_ids
        return SequenceChunk(c.request.id, tokens, c.start, self.kv.block_table(c.request), c.samples,
                             c.request.needs_prompt_logits, len(c.draft_token_ids))

    def _fail(self, request: Request, reason: str) -> RequestOutput:
        """End one request with finish_reason "error"; its blocks are freed, the batch goes on."""
        request.fail(reason)
        output = request.output("", [])
        self._remove(request)
        return output

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """End every request with an error (after a step failed in a way no single request explains),
        so the engine is empty and consistent again."""
        self._take_inbox()
        return [self._fail(request, reason) for request in list(self.requests.values())]

    def run_to_completion(self, prompts: list[str | list[int]],
                          params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in prompt order. Any number of prompts: they are
        submitted as the waiting queue has room. A request the engine failed has finish_reason "error"."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        while len(final) < len(prompts):
            while len(ids) < len(prompts):
                try:
                    ids.append(self.submit(prompts[len(ids)], params_list[len(ids)]))
                except QueueFull:
                    break
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """One request's outputs as they come (steps the engine in this thread; for single-user callers).
        Raises RequestFailed if the engine fails the request."""
        request_id = self.submit(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        if out.finish_reason == "error":
                            raise RequestFailed(f"request {request_id}: {out.error}")
                        yield out
                        if out.finished:
                            return
        finally:
            if request_id in self.requests:  # the consumer stopped early
                self.cancel(request_id)
                self._take_inbox()

    def runtime_summary(self) -> str:
        """The start-up line: "dtype: bf16 (AVX-512 BF16 + AMX detected), decode: compiled (...)"."""
        from .options import dtype_label

        return f"dtype: {dtype_label(self.dtype)} ({self.dtype_reason}), decode: {self.compile_status}"

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           free_blocks=self.kv.num_free_blocks, total_blocks=len(self.kv.blocks),
                           preemptions=self.scheduler.num_preemptions, generated_tokens=self.generated_tokens,
                           prefix_cache=self.kv.stats, kv_cache_dtype=self.config.kv_cache_dtype,
                           kv_cache_bytes_per_token=self.kv_bytes_per_token, block_size=self.kv.block_size,
                           speculation=self.speculation if self.config.speculative is not None else None)

    def _take_inbox(self) -> list[RequestOutput]:
        with self._lock:
            new, self._new = self._new, []
            cancelled, self._cancelled = self._cancelled, []
        for request in new:
            self.scheduler.add(request)  # the queue bound was checked in submit
        outputs = []
        for request_id in cancelled:
            request = self.requests.get(request_id)
            if request is not None:
                delta = request.cancel()
                outputs.append(request.output(delta, []))
                self._remove(request)
        return outputs

    def _remove(self, request: Request):
        self.scheduler.remove(request)
        self.runner.release(request.id)
        with self._lock:
            del self.requests[request.id]
