"""Fill-in-the-middle transformation, applied per document at character level before tokenizing.

After Bavarian et al. 2022 and DeepSeek-Coder: with probability `rate`, split a document at two uniformly
random character positions into prefix / middle / suffix and reorder it so the model learns to write the
middle given both sides. Token ids are joined around the special tokens (never parsed from text), so source
code that happens to contain a special token's spelling cannot inject one.
"""

from __future__ import annotations

import random

from ..tokenizer import Tokenizer

MODES = ("psm", "spm")


def split_document(text: str, rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def fim_pieces(text: str, rng: random.Random, rate: float) -> list[str]:
    """[text] (left as is) or [prefix, middle, suffix] (to be rearranged), decided by `rng`."""
    if rate > 0 and rng.random() < rate:
        return list(split_document(text, rng))
    return [text]


def assemble(pieces: list[list[int]], tok: Tokenizer, mode: str = "psm") -> list[int]:
    """Token ids for one document from its encoded pieces: BOS, body, EOS.

    PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle
    SPM: <fim_begin> <fim_hole> suffix <fim_end> prefix middle   (the StarCoder/Megatron SPM variant)
    """
    if mode not in MODES:
        raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")
    if len(pieces) == 1:
        body = pieces[0]
    elif mode == "psm":
        prefix, middle, suffix = pieces
        body = [tok.fim_begin_id, *prefix, tok.fim_hole_id, *suffix, tok.fim_end_id, *middle]
    else:
        prefix, middle, suffix = pieces
        body = [tok.fim_begin_id, tok.fim_hole_id, *suffix, tok.fim_end_id, *prefix, *middle]
    return [tok.bos_id, *body, tok.eos_id]


def encode_document(text: str, tok: Tokenizer, rng: random.Random, rate: float, mode: str = "psm") -> list[int]:
    """One document's token ids, FIM-transformed with probability `rate`."""
    return assemble(tok.encode_batch(fim_pieces(text, rng, rate)), tok, mode)
