"""Prompts for the inference tasks: completion, fill-in-the-middle (alone or with other files of the
repository before it, within a token budget), repository-level completion, chat.

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
REPO_TOKENS = ((REPO_NAME, FILE_SEP), ("<repo_name>", "<file_sep>"))  # Qwen2.5-Coder, StarCoder2
PREFIX_CUT_LINES = 16  # a prefix over the budget loses its first lines in steps of this many


@dataclass
class InfillPrompt:
    """A fill-in-the-middle prompt with repository context, and what the token budget left out."""

    ids: list[int]
    files_used: int  # how many of the context files made it into the prompt (the last ones)
    truncated: bool  # the prefix or suffix was cut, or context files were left out, to fit the budget


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

    def repo_tokens(self) -> tuple[str, str] | None:
        """(repo-name token, file-separator token) when the tokenizer has a repository format."""
        return next((pair for pair in REPO_TOKENS if all(t in self.vocab for t in pair)), None)

    def infill(self, prefix: str, suffix: str, files: list[tuple[str, str]] = (), path: str | None = None,
               repo_name: str = "", budget: int | None = None, cut_code: bool = True) -> InfillPrompt:
        """Fill in the middle of file `path` between `prefix` and `suffix`, with other repository `files`
        (path, text) before it, most relevant last. Context comes first, so successive requests from one
        file share a long prompt prefix (the prefix cache reuses it).

        Layouts: with repository tokens (Qwen2.5-Coder, StarCoder2)
            <repo_name>name <file_sep>path\ntext ... <file_sep>path\n <PRE>prefix <SUF>suffix <MID>
        otherwise (minicoder, DeepSeek-Coder, CodeLlama): path-header comments inside the prefix, as in
        repository-level training data with fill-in-the-middle applied to the whole document
            <PRE>#a.py\ntext ... #path\nprefix <SUF>suffix <MID>

        `budget`: most prompt tokens. Over it, context files are left out (least relevant first), and
        with `cut_code` the prefix loses its start and the suffix its end (3:1 as llama.cpp's server
        splits them); without, the prompt may stay over the budget (the caller rejects it).
        """
        fmt = self.fim_format
        if fmt is None:
            raise ValueError("this tokenizer has no fill-in-the-middle tokens")
        vocab, repo = self.vocab, self.repo_tokens()
        pre, suf, mid = vocab[fmt.prefix], vocab[fmt.suffix], vocab[fmt.middle]
        if repo is not None:
            name_id, sep = vocab[repo[0]], vocab[repo[1]]
            head = [name_id, *self.text(f"{repo_name}\n")] if files or path else []
            blocks = [[sep, *self.text(f"{p}\n" if p else ""), *self.text(f"{text.rstrip()}\n")] for p, text in files]
            current = [sep, *self.text(f"{path}\n" if path else "")] if files or path else []
            before, after = [*self.start_ids, *head], [*current, pre]
        else:
            from ..data.corpus import path_header  # the training data's own header format
            from ..data.sources import language_of

            def header(p: str) -> str:
                return f"{path_header(p, language_of(p) or '')}\n" if p else ""

            blocks = [self.text(f"{header(p)}{text.rstrip()}\n\n") for p, text in files]
            current = self.text(header(path)) if path and files else []
            before, after = [*self.start_ids, pre], current
        prefix_ids, suffix_ids = self.text(prefix), self.text(suffix)
        fixed = len(before) + len(after) + 2  # + <SUF> and <MID>
        truncated = False
        if cut_code and budget is not None and fixed + len(prefix_ids) + len(suffix_ids) > budget:
            room = max(budget - fixed, 0)
            keep_suffix = min(len(suffix_ids), max(room // 4, room - len(prefix_ids)))
            prefix_ids = self._cut_prefix(prefix, prefix_ids, room - keep_suffix)
            suffix_ids = suffix_ids[:keep_suffix]
            truncated = True
        room = None if budget is None else max(budget - fixed - len(prefix_ids) - len(suffix_ids), 0)
        used: list[list[int]] = []
        for block in reversed(blocks):  # most relevant (last) first
            if room is not None and len(block) > room:
                truncated = True
                break
            used.insert(0, block)
            room = None if room is None else room - len(block)
        context = [t for block in used for t in block]
        ids = [*before, *context, *after, *prefix_ids, suf, *suffix_ids, mid]
        return InfillPrompt(ids, len(used), truncated)

    def _cut_prefix(self, prefix: str, ids: list[int], keep: int) -> list[int]:
        """At most `keep` tokens of the prefix's end. Whole lines are dropped from its start, in steps of
        PREFIX_CUT_LINES: while the user types, the cut stays put, so the prompt up to the cursor keeps
        its cached prefix (a cut moving by a token per keystroke would change every token after it)."""
        if len(ids) <= keep:
            return ids
        lines = prefix.splitlines(keepends=True)
        for drop in range(PREFIX_CUT_LINES, len(lines), PREFIX_CUT_LINES):
            kept = self.text("".join(lines[drop:]))
            if len(kept) <= keep:
                return kept
        return ids[len(ids) - keep :] if keep > 0 else []  # one long line: cut tokens

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

    @property
    def chat_template(self) -> str:
        """The tokenizer's chat template, or DeepSeek-Coder-instruct's layout when it has none."""
        return self.tokenizer.chat_template or CHAT_TEMPLATE

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template (DeepSeek-Coder-instruct style when it has none), ready for the reply.

        Message text is data: a control token spelled inside a message is encoded as plain text."""
        text = self._render(messages)
        if self._special is None or not any(self._special.search(_content(m)) for m in messages):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._chat_with_literal_controls(messages, text)

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
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
