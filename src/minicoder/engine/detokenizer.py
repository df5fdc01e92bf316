"""Streaming text out of token ids: incremental detokenization and stop strings.

Both hold text back rather than emit something they might have to take back: a token that ends inside
a multi-byte UTF-8 character decodes to U+FFFD until the next token completes it, and text that could be
the start of a stop string waits until the next tokens show whether it is one.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas.

    Each step decodes a short window (the previous few tokens plus the new ones) twice, with and without
    the new tokens; the difference is the new text. The left context matters for tokenizers that decode a
    token differently at the start of a text (SentencePiece drops the leading space).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], context: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:])
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # tokens before this have been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._new_text(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        return self._new_text(final=True) if self.read_offset < len(self.ids) else ""

    def _new_text(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(REPLACEMENT_CHAR)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""


class StopStringFilter:
    """Cuts the text before the first stop string and never lets part of one out early.

    A stop string can only begin in text not yet released, because any suffix that could start one is
    held back; so searching the pending text is enough.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""  # released so far
        self.pending = ""
        self.stopped = False

    def add(self, delta: str) -> bool:
        """Append decoded text; True when it completes a stop string (the text then ends before it)."""
        if self.stopped or not delta:
            return self.stopped
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = self.pending[: min(hits)]
            self.stopped = True
        return self.stopped

    def release(self) -> str:
        """The pending text that cannot be the start of a stop string."""
        keep = 0 if self.stopped else self._longest_stop_prefix_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def flush(self, tail: str = "") -> str:
        """At the end of the request: add the last text and release everything before any stop string."""
        self.add(tail)
        out, self.pending = self.pending, ""
        self.text += out
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        """The longest end of the pending text that is a proper prefix of some stop string. Only the
        positions holding a stop's first character are tried, so a long stop string costs little per token."""
        best, pending = 0, self.pending
        for stop in self.stops:
            i = pending.find(stop[0], max(0, len(pending) - len(stop) + 1))
            while i != -1 and len(pending) - i > best:
                if stop.startswith(pending[i:]):
                    best = len(pending) - i
                    break
                i = pending.find(stop[0], i + 1)
        return best
