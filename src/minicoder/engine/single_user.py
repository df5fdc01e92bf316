"""One caller, one request at a time: prompt building plus a streamed request on the engine.

What `minicoder generate`, `--chat`, and single-user tools use. It owns no sampling or cache code:
everything runs through `Engine` (docs/ARCHITECTURE.md principle 3: the engine is the only place that generates).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .engine import Engine, EngineConfig
from .sampling_params import SamplingParams


class SingleUserEngine:
    """The engine sized for one sequence, with prompt building: text in, text (or token ids) out."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        # One sequence at a time needs only one sequence's worth of KV blocks.
        self.engine = Engine(model_dir, config or EngineConfig(max_num_seqs=1))
        self.tokenizer = self.engine.tokenizer
        self.prompts = self.engine.prompts

    def prompt_ids(self, prompt: str, suffix: str | None = None) -> list[int]:
        """A completion prompt, or a fill-in-the-middle prompt when `suffix` is given."""
        return self.prompts.fim(prompt, suffix) if suffix is not None else self.prompts.completion(prompt)

    def stream_token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield new token ids as they are generated; the stop token that ends the reply is not yielded."""
        for out in self.engine.stream(list(prompt_ids), params):
            for token in out.delta_token_ids:
                if not (out.finished and out.finish_reason == "stop" and token in self.engine.eos_token_ids):
                    yield token

    def complete(self, prompt: str, suffix: str | None = None, params: SamplingParams | None = None) -> str:
        """The completion of `prompt` (filling in the middle before `suffix` when given)."""
        return self._text(self.prompt_ids(prompt, suffix), params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> str:
        """The assistant's reply to `messages`, laid out with the model's chat template."""
        return self._text(self.prompts.chat(messages), params)

    def _text(self, prompt_ids: list[int], params: SamplingParams | None) -> str:
        text = ""
        for out in self.engine.stream(prompt_ids, params or SamplingParams()):
            text = out.text
        return text
