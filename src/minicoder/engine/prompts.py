"""Prompts for the four inference tasks: completion, fill-in-the-middle, repository-level completion, chat.

The FIM format is found from the tokenizer's special tokens, so one server builds the right prompt for
minicoder, DeepSeek-Coder, StarCoder, Qwen2.5-Coder or CodeLlama. Control tokens go in as ids; the
user's code is encoded as plain text, so code that happens to spell `<|EOT|>` stays text. That holds for
chat too: only the control tokens the chat template itself writes become control tokens, never one typed
inside a message (which would let a user end the turn or forge an assistant reply).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ..tokenizer import CHAT_TEMPLATE


@dataclass(frozen=True)
class FimFormat:
    """Prefix-suffix-middle infilling: <prefix> prefix <suffix> suffix <middle>, the model writes the middle."""

    family: str
    prefix: str
    suffix: str
    middle: str


FIM_FORMATS = (
    FimFormat("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # minicoder too
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    FimFormat("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # CodeGemma too
    FimFormat("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>"),
)

# Qwen2.5-Coder's repository format; others get path-header comments as in minicoder's training data.
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"


def find_fim_format(vocab: Mapping[str, int]) -> FimFormat | None:
    """The first known FIM format whose three tokens are all in the vocabulary."""
    for fmt in FIM_FORMATS:
        if all(token in vocab for token in (fmt.prefix, fmt.suffix, fmt.middle)):
            return fmt
    return None


class PromptBuilder:
    """Token-id prompts for one tokenizer (a `transformers` tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        self.fim_format = find_fim_format(self.vocab)
        # What the tokenizer puts before a text (BOS for Llama and DeepSeek-Coder, nothing for StarCoder).
        plain, full = self.text("a"), tokenizer.encode("a")
        self.start_ids = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
        added = tokenizer.added_tokens_decoder.values()
        self._special = _alternation(t.content for t in added if t.special)  # what split_special_tokens guards
        self._added = _alternation(t.content for t in added)  # what the tokenizer parses out of any text

    def text(self, text: str) -> list[int]:
        """Text as data: special-token spellings inside it stay plain text."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def completion(self, prompt: str) -> list[int]:
        """A raw prompt, as `tokenizer.encode` reads it: BOS added, special-token spellings parsed
        (users write DeepSeek-Coder FIM prompts by hand this way)."""
        return self.tokenizer.encode(prompt)

    def fim(self, prefix: str, suffix: str) -> list[int]:
        fmt = self.fim_format
        if fmt is None:
            raise ValueError("this tokenizer has no fill-in-the-middle tokens")
        vocab = self.vocab
        return [*self.start_ids, vocab[fmt.prefix], *self.text(prefix), vocab[fmt.suffix], *self.text(suffix),
                vocab[fmt.middle]]

    def repository(self, files: list[tuple[str, str]], path: str, code: str, repo_name: str = "") -> list[int]:
        """Complete `code` of file `path`, with the repository's other `files` (path, text) before it,
        dependencies first, each under a path header (DeepSeek-Coder repository-level completion)."""
        if FILE_SEP in self.vocab and REPO_NAME in self.vocab:
            sep = self.vocab[FILE_SEP]
            ids = [*self.start_ids, self.vocab[REPO_NAME], *self.text(f"{repo_name}\n")]
            for file_path, text in files:
                ids += [sep, *self.text(f"{file_path}\n{text.rstrip()}\n")]
            return [*ids, sep, *self.text(f"{path}\n{code}")]
        from ..data.corpus import path_header  # the training data's own header format
        from ..data.sources import language_of

        blocks = [f"{path_header(p, language_of(p) or '')}\n{text.rstrip()}\n" for p, text in files]
        blocks.append(f"{path_header(path, language_of(path) or '')}\n{code}")
        return [*self.start_ids, *self.text("\n".join(blocks))]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template (DeepSeek-Coder-instruct style when it has none), ready for the reply.

        Message text is data: a control token spelled inside a message is encoded as plain text."""
        text = self._render(messages)
        if self._special is None or not any(self._special.search(_content(m)) for m in messages):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._chat_with_literal_controls(messages, text)

    def _render(self, messages: list[dict[str, str]]) -> str:
        template = None if self.tokenizer.chat_template else CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def _chat_with_literal_controls(self, messages: list[dict[str, str]], text: str) -> list[int]:
        """Render with a marker in place of each message, so the template's own control tokens are known;
        then encode each run of text between them (template text and message text together, as the
        tokenizer would) with special-token spellings kept as text."""
        marker = f"\ue000{secrets.token_hex(8)}\ue001"
        layout = self._render([{**m, "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)])
        pieces = re.split(f"{marker}(\\d+){marker}", layout)  # template, message index, template, ...
        if "".join(_content(messages[int(p)]) if k % 2 else p for k, p in enumerate(pieces)) != text:
            found = self._special.search("".join(_content(m) for m in messages)).group()
            raise ValueError(f"a message contains the control token {found!r}, and this model's chat template "
                             "rewrites message text, so it cannot be kept as plain text")
        ids, run = [], ""
        for k, piece in enumerate(pieces):
            if k % 2:
                run += _content(messages[int(piece)])
                continue
            parts = self._added.split(piece) if self._added else [piece]  # text, control, text, ...
            for j, part in enumerate(parts):
                if j % 2 == 0:
                    run += part
                else:
                    ids += self.text(run) if run else []
                    ids.append(self.vocab[part])
                    run = ""
        return ids + (self.text(run) if run else [])


def _content(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _alternation(tokens) -> re.Pattern | None:
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)  # longest first, as the tokenizer matches
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
