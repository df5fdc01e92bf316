"""Prompts for the four inference tasks: completion, fill-in-the-middle, repository-level completion, chat.

The FIM format is found from the tokenizer's special tokens, so one server builds the right prompt for
minicoder, DeepSeek-Coder, StarCoder, Qwen2.5-Coder or CodeLlama. Control tokens go in as ids; the
user's code is encoded as plain text, so code that happens to spell `<|EOT|>` stays text.
"""

from __future__ import annotations

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
        """The tokenizer's chat template (DeepSeek-Coder-instruct style when it has none), ready for the reply."""
        template = None if self.tokenizer.chat_template else CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)
