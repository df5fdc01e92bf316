"""Fill-in-the-middle prompts with repository context, shared by every route that fills in code
(`/infill`, `/v1/completions` with `suffix`, Tabby's completions, Ollama's `/api/generate` with `suffix`).

Context files come from two places: those the client sends (llama.vim's ring buffer, Tabby's declarations
and snippets, `input_extra` on `/v1/completions`) and, with `minicoder serve --repo DIR`, the most
relevant chunks of that repository (BM25, `repo_index.py`) within `--repo-context-tokens`. Repository
snippets go first and the client's files last (nearest the code: clients send what they judge closest).
The whole prompt is cut to leave room for the completion (`PromptBuilder.infill`).
"""

from __future__ import annotations

from ..engine.prompts import InfillPrompt, PromptBuilder
from .errors import APIError
from .repo_index import RepoIndex


class FimContext:
    def __init__(self, prompts: PromptBuilder, context: int, index: RepoIndex | None = None,
                 repo_context_tokens: int = 1024, repo_name: str = ""):
        self.prompts, self.context, self.index = prompts, context, index
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
        context_files = list(files or [])
        if self.index is not None:
            budget = min(self.repo_context_tokens, max(self.context - reserve, 0) // 2)
            context_files = self.index.snippets(prefix, exclude_path=path, budget=budget) + context_files
        return self.prompts.infill(prefix, suffix, context_files, path, self.repo_name,
                                   budget=max(self.context - reserve, 1), cut_code=cut_code)

    def close(self):
        if self.index is not None:
            self.index.close()
