"""Fill-in-the-middle prompts with repository context, shared by every route that fills in code
(`/infill`, `/v1/completions` with `suffix`, Tabby's completions, Ollama's `/api/generate` with `suffix`).

Context files come from two places: those the client sends (llama.vim's ring buffer, Tabby's declarations
and snippets, `input_extra` on `/v1/completions`) and, with `minicoder serve --repo DIR`, the most
relevant chunks of that repository (BM25, `repo_index.py`) within `--repo-context-tokens`. Repository
snippets go first and the client's files last (nearest the code: clients send what they judge closest).
The whole prompt is cut to leave room for the completion (`PromptBuilder.infill`).
"""

from __future__ import annotations

import asyncio

from ..engine.prompts import InfillPrompt, PromptBuilder
from .errors import APIError
from .repo_index import RepoIndex


class FimContext:
    def __init__(self, prompts: PromptBuilder, context: int, index: RepoIndex | None = None,
                 repo_context_tokens: int = 1024, repo_name: str = "", max_chars: int | None = None):
        self.prompts, self.context, self.index = prompts, context, index
        # No prompt of more characters than this fits the context (the server derives it from the longest
        # vocabulary entry): longer code is cut or refused *before* tokenizing, so a huge body costs no time.
        self.max_chars = max_chars
        self.repo_context_tokens = repo_context_tokens
        self.repo_name = repo_name or (index.root.name if index is not None else "")

    def prompt(self, prefix: str, suffix: str, files: list[tuple[str, str]] | None = None,
               path: str | None = None, reserve: int = 0, param: str = "suffix", cut_code: bool = True
               ) -> InfillPrompt:
        """The prompt for a hole between `prefix` and `suffix` of file `path`, at most `context - reserve`
        tokens (`reserve`: the completion's room) by leaving context files out, and with `cut_code` by
        cutting the prefix and suffix too (llama.cpp's /infill does; OpenAI's API answers 400 instead).
        Errors name `param`."""
        if self.prompts.fim_format is None:
            raise APIError("this model's tokenizer has no fill-in-the-middle tokens", param=param,
                           code="unsupported")
        prefix, suffix, files = self._bound(prefix, suffix, list(files or []), param, cut_code)
        context_files = files
        if self.index is not None:
            budget = min(self.repo_context_tokens, max(self.context - reserve, 0) // 2)
            context_files = self.index.snippets(prefix, exclude_path=path, budget=budget) + context_files
        return self.prompts.infill(prefix, suffix, context_files, path, self.repo_name,
                                   budget=max(self.context - reserve, 1), cut_code=cut_code)

    async def aprompt(self, *args, **kwargs) -> InfillPrompt:
        """`prompt`, tokenizing off the event loop."""
        return await asyncio.to_thread(self.prompt, *args, **kwargs)

    def _bound(self, prefix: str, suffix: str, files: list[tuple[str, str]], param: str, cut_code: bool):
        limit = self.max_chars
        if limit is None:
            return prefix, suffix, files
        if len(prefix) + len(suffix) > limit:
            if not cut_code:
                raise APIError(f"the prompt has {len(prefix) + len(suffix)} characters, more than this model's "
                               f"context of {self.context} tokens can hold (at most {limit} characters)",
                               param=param, code="context_length_exceeded")
            prefix, suffix = prefix[-limit:], suffix[:limit]  # the code nearest the hole is what stays anyway
        kept, total = [], 0
        for path, text in reversed(files):  # most relevant last: keep from the end
            total += len(path) + len(text)
            if total > limit:
                break
            kept.append((path, text))
        return prefix, suffix, kept[::-1]

    def close(self):
        if self.index is not None:
            self.index.close()
