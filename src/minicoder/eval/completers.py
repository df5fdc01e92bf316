"""Where evaluation completions come from: the in-process engine or any OpenAI-compatible endpoint.

Both expose `complete(prompts, n, temperature, max_tokens, stop, suffixes=None) -> list[list[str]]`
(n completions per prompt). Stop strings are applied here as well, so results do not depend on whether
the backend honours them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@dataclass
class LocalCompleter:
    """Generates with minicoder's engine in this process, all prompts x samples batched together."""

    model_dir: str
    seed: int = 0
    compression: dict | None = None  # EngineConfig's quantize / kv_cache_dtype

    def __post_init__(self):
        from ..engine.engine import Engine, EngineConfig

        self.engine = Engine(self.model_dir, EngineConfig(**(self.compression or {})))
        self.name = str(self.model_dir)
        self.truncated_prompts = 0

    def budget(self, max_tokens: int) -> tuple[int, int]:
        """(prompt tokens, new tokens) that fit the model's context together (small models have short
        contexts; HumanEval prompts run to ~600 tokens)."""
        context = self.engine.max_request_tokens
        max_tokens = min(max_tokens, context // 2)
        return context - max_tokens, max_tokens

    def fit_context(self, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """A completion prompt: keep the first token (BOS) and the newest prompt tokens."""
        budget, max_tokens = self.budget(max_tokens)
        if len(ids) > budget:
            self.truncated_prompts += 1
            ids = ids[:1] + ids[len(ids) - budget + 1 :]
        return ids, max_tokens

    def fim_prompt(self, prefix: str, suffix: str, max_tokens: int) -> tuple[list[int], int]:
        """A FIM prompt that fits, cut by the server's own rule (PromptBuilder.infill): the control tokens
        stay, the prefix loses its start and the suffix its end, 3:1."""
        budget, max_tokens = self.budget(max_tokens)
        prompt = self.engine.prompts.infill(prefix, suffix, budget=budget)
        self.truncated_prompts += prompt.truncated
        return prompt.ids, max_tokens

    def complete(self, prompts, n, temperature, max_tokens, stop, suffixes=None, progress=True):
        from ..engine.sampling_params import SamplingParams

        jobs, params = [], []
        for i, prompt in enumerate(prompts):
            if suffixes:
                ids, max_new = self.fim_prompt(prompt, suffixes[i], max_tokens)
            else:
                ids, max_new = self.fit_context(self.engine.prompts.completion(prompt), max_tokens)
            for j in range(n):
                jobs.append(ids)
                params.append(SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                             top_p=0.95 if temperature else 1.0, stop=list(stop),
                                             seed=self.seed * 1_000_003 + i * 1009 + j))
        outputs = []
        bar = tqdm(total=len(jobs), desc="generate", unit="sample", disable=not progress)
        for start in range(0, len(jobs), 64):  # chunks, so the bar moves
            outputs += self.engine.run_to_completion(jobs[start : start + 64], params[start : start + 64])
            bar.update(min(64, len(jobs) - start))
        bar.close()
        texts = [cut_at_stop(o.text, stop) for o in outputs]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


@dataclass
class EndpointCompleter:
    """Calls `/v1/completions` of an OpenAI-compatible server (minicoder serve, vLLM, llama.cpp, ...)."""

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"

    def __post_init__(self):
        from openai import OpenAI

        self.client = OpenAI(base_url=self.base_url, api_key=self.api_key)
        if self.model is None:
            self.model = self.client.models.list().data[0].id
        self.name = f"{self.model} @ {self.base_url}"

    def complete(self, prompts, n, temperature, max_tokens, stop, suffixes=None, progress=True):
        out = []
        for i, prompt in enumerate(tqdm(prompts, desc="generate", unit="prompt", disable=not progress)):
            extra = {"suffix": suffixes[i]} if suffixes else {}
            resp = self.client.completions.create(model=self.model, prompt=prompt, n=n, temperature=temperature,
                                                  max_tokens=max_tokens, stop=stop[:4] or None, **extra)
            choices = sorted(resp.choices, key=lambda c: c.index)
            out.append([cut_at_stop(c.text, stop) for c in choices])
        return out


def make_completer(model: str | None, endpoint: str | None, seed: int = 0, compression: dict | None = None):
    from ..errors import MinicoderError

    if bool(model) == bool(endpoint):
        raise MinicoderError("give either a MODEL directory or --endpoint URL (not both)")
    if endpoint and compression and (compression.get("quantize") or compression.get("kv_cache_dtype") != "auto"):
        raise MinicoderError("--quantize / --kv-cache-dtype apply to a local MODEL, not to --endpoint")
    return EndpointCompleter(endpoint) if endpoint else LocalCompleter(model, seed=seed, compression=compression)
