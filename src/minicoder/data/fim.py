"""Fill-in-the-middle transformation of one chunk of code, at character level, before tokenizing.

After Bavarian et al. 2022 (FIM) and DeepSeek-Coder / StarCoder: a chunk chosen for FIM is split into
prefix / middle / suffix and reordered so the model learns to write the middle given both sides. Two ways
to choose the middle, mixed:
  - random: two uniformly random character positions (the paper's character-level FIM);
  - lines:  one whole line (sometimes two to four), laid out exactly as an editor asks for single-line
            infilling: the prefix ends with the line break before the hole, the suffix starts with the
            line break after it, the middle has neither.
PSM and SPM orders are mixed too (training on both transfers to each, paper section 4). The chunks come
from `chunking.py` and are shorter than a training window, so the three parts are always seen together.
Token ids are joined around the special tokens (never parsed from text), so source code that happens to
contain a special token's spelling cannot inject one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..tokenizer import Tokenizer

MODES = ("psm", "spm")


@dataclass(frozen=True)
class FimSettings:
    rate: float = 0.5  # share of training chunks that are FIM-transformed
    spm_rate: float = 0.5  # share of those laid out suffix-prefix-middle
    line_rate: float = 0.5  # share of those whose middle is whole line(s) rather than a random span

    def validate(self):
        for name in ("rate", "spm_rate", "line_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--fim-{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


def split_random(text: str, rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def split_lines(text: str, rng: random.Random) -> tuple[str, str, str] | None:
    """A middle of 1 (three times in four) to 4 whole non-blank-started lines, or None when there is no such line."""
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    if not candidates:
        return None
    first = rng.choice(candidates)
    count = 1 if rng.random() < 0.75 else rng.randint(2, 4)
    last = min(len(lines), first + count)
    while last > first + 1 and not lines[last - 1].strip():
        last -= 1  # a middle ends on code, never on a blank line
    prefix = "".join(line + "\n" for line in lines[:first])
    middle = "\n".join(lines[first:last])
    suffix = "".join("\n" + line for line in lines[last:])
    return prefix, middle, suffix


def choose_split(text: str, rng: random.Random, settings: FimSettings) -> tuple[str, str, str]:
    if rng.random() < settings.line_rate:
        pieces = split_lines(text, rng)
        if pieces is not None:
            return pieces
    return split_random(text, rng)


def fim_decision(text: str, rng: random.Random, settings: FimSettings) -> tuple[list[str], str]:
    """([text], "plain") for a chunk left as is, or ([prefix, middle, suffix], "psm" | "spm")."""
    if settings.rate > 0 and rng.random() < settings.rate:
        mode = "spm" if rng.random() < settings.spm_rate else "psm"
        return list(choose_split(text, rng, settings)), mode
    return [text], "plain"


def assemble(pieces: list[list[int]], tok: Tokenizer, mode: str = "psm") -> list[int]:
    """Token ids for one chunk from its encoded pieces: BOS, body, EOS.

    PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle
    SPM: <fim_begin> <fim_hole> suffix <fim_end> prefix middle   (the StarCoder/Megatron SPM variant)
    """
    if len(pieces) == 1:
        body = pieces[0]
    elif mode == "psm":
        prefix, middle, suffix = pieces
        body = [tok.fim_begin_id, *prefix, tok.fim_hole_id, *suffix, tok.fim_end_id, *middle]
    elif mode == "spm":
        prefix, middle, suffix = pieces
        body = [tok.fim_begin_id, tok.fim_hole_id, *suffix, tok.fim_end_id, *prefix, *middle]
    else:
        raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")
    return [tok.bos_id, *body, tok.eos_id]


def encode_chunk(text: str, tok: Tokenizer, rng: random.Random, settings: FimSettings) -> list[int]:
    """One chunk's token ids, FIM-transformed with probability `settings.rate`."""
    pieces, mode = fim_decision(text, rng, settings)
    return assemble(tok.encode_batch(pieces), tok, mode)
