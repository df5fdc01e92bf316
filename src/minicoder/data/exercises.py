"""Procedurally generated Python exercises: a signature, a docstring with examples, a reference body, tests.

Written from scratch for minicoder (string, list, dict, arithmetic and sorting idioms; no evaluation set
was looked at or transformed). Each family draws its function name, parameter names, wording, constants and
solution style from a seeded RNG, and computes expected outputs with an independent host-side oracle. Every
reference solution is then executed against its tests in minicoder's sandbox, and only those that pass are
kept (`verify`). `minicoder data tasks` decontaminates them (10-gram overlap with HumanEval, HumanEval's
entry-point names) and writes them with the mined corpus functions; SFT uses them in chat form.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from ..sandbox import Limits, run_python

VERDICT = "__EXERCISE_VERDICTS__"
BATCH = 200  # exercises checked per sandbox run


@dataclass
class Exercise:
    name: str
    params: list[str]
    summary: str  # one sentence: what the function returns
    body: str  # the reference solution's body, indented by 4
    cases: list[tuple[tuple, object]] = field(default_factory=list)  # (arguments, expected result)
    family: str = ""

    @property
    def signature(self) -> str:
        return f"def {self.name}({', '.join(self.params)}):"

    def docstring(self, examples: int = 2) -> str:
        lines = [self.summary, ""]
        for args, expected in self.cases[:examples]:
            lines += [f">>> {self.name}({', '.join(map(repr, args))})", repr(expected)]
        return '    """' + "\n".join(f"    {line}" if line else "" for line in lines).strip() + '\n    """\n'

    def code(self) -> str:
        """Completion form: the function as it would appear in a file."""
        return f"{self.signature}\n{self.docstring()}{self.body}"

    def tests(self) -> str:
        return "".join(f"assert {self.name}({', '.join(map(repr, a))}) == {e!r}\n" for a, e in self.cases)

    def instruction(self) -> str:
        """Chat form: the request a user would type."""
        return f"Write a Python function `{self.signature[4:-1]}`. {self.summary}"


def words(rng: random.Random, n: int) -> list[str]:
    pool = ["apple", "river", "stone", "cloud", "tiger", "lamp", "green", "orbit", "maple", "delta", "quiet",
            "piano", "ember", "north", "salt", "violet", "hammer", "lemon", "frost", "cedar", "pixel", "ocean"]
    return [rng.choice(pool) for _ in range(n)]


def ints(rng: random.Random, n: int, lo: int = -9, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def pick(rng: random.Random, *options):
    return rng.choice(options)


# Each family: rng -> (name, params, summary, body, oracle, argument generator).
Family = Callable[[random.Random], tuple]


def count_char(rng):
    ch = rng.choice("aeiost")
    name = pick(rng, f"count_{ch}", f"number_of_{ch}s", f"{ch}_count")
    p = pick(rng, "text", "s", "word")
    body = pick(rng, f"    return {p}.count({ch!r})\n",
                f"    total = 0\n    for c in {p}:\n        if c == {ch!r}:\n            total += 1\n    return total\n")
    return (name, [p], f"Return how many times the letter {ch!r} occurs in `{p}`.", body,
            lambda s: s.count(ch), lambda: (" ".join(words(rng, rng.randint(1, 4))),))


def reverse_words(rng):
    p = pick(rng, "sentence", "text", "line")
    name = pick(rng, "reverse_words", "words_backwards", "flip_word_order")
    body = pick(rng, f"    return ' '.join(reversed({p}.split()))\n", f"    parts = {p}.split()\n    return ' '.join(parts[::-1])\n")
    return (name, [p], f"Return `{p}` with its words in reverse order, separated by single spaces.", body,
            lambda s: " ".join(reversed(s.split())), lambda: (" ".join(words(rng, rng.randint(1, 5))),))


def sum_multiples(rng):
    k = rng.randint(2, 5)
    p = pick(rng, "numbers", "values", "nums")
    name = pick(rng, f"sum_of_multiples_of_{k}", f"total_divisible_by_{k}")
    body = pick(rng, f"    return sum(x for x in {p} if x % {k} == 0)\n",
                f"    total = 0\n    for x in {p}:\n        if x % {k} == 0:\n            total += x\n    return total\n")
    return (name, [p], f"Return the sum of the elements of `{p}` that are divisible by {k}.", body,
            lambda xs: sum(x for x in xs if x % k == 0), lambda: (ints(rng, rng.randint(0, 7)),))


def above_threshold(rng):
    t = rng.randint(0, 10)
    p = pick(rng, "numbers", "items", "scores")
    name = pick(rng, f"greater_than_{t}", f"keep_above_{t}", f"values_over_{t}")
    body = pick(rng, f"    return [x for x in {p} if x > {t}]\n",
                f"    result = []\n    for x in {p}:\n        if x > {t}:\n            result.append(x)\n    return result\n")
    return (name, [p], f"Return the elements of `{p}` greater than {t}, in their original order.", body,
            lambda xs: [x for x in xs if x > t], lambda: (ints(rng, rng.randint(0, 7)),))


def cumulative_sum(rng):
    p = pick(rng, "numbers", "steps", "amounts")
    name = pick(rng, "running_total", "prefix_sums", "cumulative_sums")
    body = pick(rng, f"    out = []\n    total = 0\n    for x in {p}:\n        total += x\n        out.append(total)\n    return out\n",
                f"    import itertools\n    return list(itertools.accumulate({p}))\n")
    def oracle(xs):
        out, t = [], 0
        for x in xs:
            t += x
            out.append(t)
        return out
    return (name, [p], f"Return the list of running totals of `{p}`.", body, oracle, lambda: (ints(rng, rng.randint(0, 6)),))


def invert_dict(rng):
    p = pick(rng, "mapping", "table", "d")
    name = pick(rng, "invert_mapping", "swap_keys_and_values", "reverse_lookup")
    body = pick(rng, f"    return {{v: k for k, v in {p}.items()}}\n",
                f"    result = {{}}\n    for key, value in {p}.items():\n        result[value] = key\n    return result\n")
    def gen():
        keys = rng.sample(string.ascii_lowercase, rng.randint(0, 5))
        return ({k: i for i, k in enumerate(keys)},)
    return (name, [p], f"Return a new dict mapping each value of `{p}` to its key (the values are distinct).", body,
            lambda d: {v: k for k, v in d.items()}, gen)


def word_frequencies(rng):
    p = pick(rng, "text", "document", "sentence")
    name = pick(rng, "word_counts", "count_words_in", "frequency_of_words")
    body = pick(rng, f"    counts = {{}}\n    for w in {p}.split():\n        counts[w] = counts.get(w, 0) + 1\n    return counts\n",
                f"    from collections import Counter\n    return dict(Counter({p}.split()))\n")
    def oracle(s):
        c = {}
        for w in s.split():
            c[w] = c.get(w, 0) + 1
        return c
    return (name, [p], f"Return a dict from each whitespace-separated word of `{p}` to how often it occurs.", body,
            oracle, lambda: (" ".join(words(rng, rng.randint(0, 6))),))


def group_by_first_letter(rng):
    p = pick(rng, "names", "words", "terms")
    name = pick(rng, "group_by_initial", "bucket_by_first_letter")
    body = f"    groups = {{}}\n    for w in {p}:\n        groups.setdefault(w[0], []).append(w)\n    return groups\n"
    def oracle(ws):
        g = {}
        for w in ws:
            g.setdefault(w[0], []).append(w)
        return g
    return (name, [p], f"Group the non-empty strings in `{p}` by their first character: return a dict from "
            "that character to the strings starting with it, in order.", body, oracle, lambda: (words(rng, rng.randint(0, 6)),))


def merge_counts(rng):
    a, b = pick(rng, ("first", "second"), ("left", "right"), ("a", "b"))
    name = pick(rng, "merge_counts", "add_tallies", "combine_counters")
    body = f"    result = dict({a})\n    for key, value in {b}.items():\n        result[key] = result.get(key, 0) + value\n    return result\n"
    def gen():
        return ({k: rng.randint(1, 5) for k in rng.sample("abcde", rng.randint(0, 3))},
                {k: rng.randint(1, 5) for k in rng.sample("abcde", rng.randint(0, 3))})
    def oracle(x, y):
        r = dict(x)
        for k, v in y.items():
            r[k] = r.get(k, 0) + v
        return r
    return (name, [a, b], f"Return a new dict with the keys of `{a}` and `{b}`; a key in both gets the sum of its values.",
            body, oracle, gen)


def factorial_of(rng):
    p = pick(rng, "n", "k", "count")
    name = pick(rng, "factorial_of", "product_up_to", "n_factorial")
    body = pick(rng, f"    result = 1\n    for i in range(2, {p} + 1):\n        result *= i\n    return result\n",
                f"    if {p} <= 1:\n        return 1\n    return {p} * {name}({p} - 1)\n")
    import math
    return (name, [p], f"Return the product of the integers from 1 to `{p}` (1 when `{p}` is 0).", body,
            math.factorial, lambda: (rng.randint(0, 10),))


def digit_total(rng):
    p = pick(rng, "number", "n", "value")
    name = pick(rng, "sum_of_digits", "digit_total", "add_digits")
    body = pick(rng, f"    return sum(int(d) for d in str(abs({p})))\n",
                f"    {p} = abs({p})\n    total = 0\n    while {p}:\n        total += {p} % 10\n        {p} //= 10\n    return total\n")
    return (name, [p], f"Return the sum of the decimal digits of the integer `{p}` (its sign is ignored).", body,
            lambda n: sum(int(d) for d in str(abs(n))), lambda: (rng.randint(-5000, 99999),))


def power_of_two(rng):
    p = pick(rng, "n", "value", "x")
    name = pick(rng, "is_power_of_two", "power_of_two_check")
    body = pick(rng, f"    return {p} > 0 and {p} & ({p} - 1) == 0\n",
                f"    if {p} < 1:\n        return False\n    while {p} % 2 == 0:\n        {p} //= 2\n    return {p} == 1\n")
    return (name, [p], f"Return True if the integer `{p}` is a power of two (1, 2, 4, ...), else False.", body,
            lambda n: n > 0 and n & (n - 1) == 0, lambda: (pick(rng, rng.randint(-4, 70), 2 ** rng.randint(0, 10)),))


def celsius(rng):
    p = pick(rng, "degrees", "celsius", "temp")
    name = pick(rng, "to_fahrenheit", "celsius_to_fahrenheit")
    body = f"    return {p} * 9 / 5 + 32\n"
    return (name, [p], f"Convert `{p}` degrees Celsius to Fahrenheit.", body, lambda c: c * 9 / 5 + 32,
            lambda: (rng.randint(-40, 100),))


def sort_by_length(rng):
    p = pick(rng, "words", "strings", "labels")
    name = pick(rng, "sort_by_length", "order_by_size", "shortest_first")
    body = pick(rng, f"    return sorted({p}, key=lambda w: (len(w), w))\n",
                f"    result = list({p})\n    result.sort(key=lambda w: (len(w), w))\n    return result\n")
    return (name, [p], f"Return `{p}` sorted by length, ties broken alphabetically.", body,
            lambda ws: sorted(ws, key=lambda w: (len(w), w)), lambda: (words(rng, rng.randint(0, 6)),))


def sort_pairs_by_second(rng):
    p = pick(rng, "pairs", "records", "entries")
    name = pick(rng, "sort_by_second", "order_by_value")
    body = f"    return sorted({p}, key=lambda item: item[1])\n"
    return (name, [p], f"Return the (name, value) tuples of `{p}` sorted by value (a stable sort).", body,
            lambda xs: sorted(xs, key=lambda t: t[1]),
            lambda: ([(w, rng.randint(0, 9)) for w in words(rng, rng.randint(0, 5))],))


def top_k(rng):
    k = rng.randint(1, 3)
    p = pick(rng, "numbers", "scores", "values")
    name = pick(rng, f"largest_{k}", f"top_{k}_values", f"best_{k}")
    body = pick(rng, f"    return sorted({p}, reverse=True)[:{k}]\n",
                f"    import heapq\n    return heapq.nlargest({k}, {p})\n")
    return (name, [p], f"Return the {k} largest elements of `{p}`, largest first (fewer if the list is shorter).", body,
            lambda xs: sorted(xs, reverse=True)[:k], lambda: (ints(rng, rng.randint(0, 7)),))


def title_words(rng):
    p = pick(rng, "text", "heading", "phrase")
    name = pick(rng, "capitalize_words", "title_words")
    body = f"    return ' '.join(w[:1].upper() + w[1:] for w in {p}.split(' '))\n"
    return (name, [p], f"Return `{p}` with the first letter of every space-separated word upper-cased.", body,
            lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split(" ")), lambda: (" ".join(words(rng, rng.randint(1, 4))),))


def dedupe(rng):
    p = pick(rng, "items", "values", "seq")
    name = pick(rng, "dedupe", "first_occurrences", "drop_repeats")
    body = pick(rng, f"    seen = set()\n    out = []\n    for x in {p}:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out\n",
                f"    return list(dict.fromkeys({p}))\n")
    return (name, [p], f"Return the elements of `{p}` without repeats, keeping the first occurrence of each.", body,
            lambda xs: list(dict.fromkeys(xs)), lambda: (ints(rng, rng.randint(0, 8), 0, 5),))


def run_length(rng):
    p = pick(rng, "text", "s", "data")
    name = pick(rng, "run_length_encode", "compress_runs")
    body = (f"    out = []\n    i = 0\n    while i < len({p}):\n        j = i\n        while j < len({p}) and {p}[j] == {p}[i]:\n"
            f"            j += 1\n        out.append({p}[i] + str(j - i))\n        i = j\n    return ''.join(out)\n")
    import itertools
    return (name, [p], f"Return the run-length encoding of `{p}`: each run of a character as the character then the run length.",
            body, lambda s: "".join(c + str(len(list(g))) for c, g in itertools.groupby(s)),
            lambda: ("".join(rng.choice("aab") * rng.randint(1, 3) for _ in range(rng.randint(0, 4))),))


def chunk_list(rng):
    n = rng.randint(2, 4)
    p = pick(rng, "items", "values", "data")
    name = pick(rng, f"chunks_of_{n}", f"split_into_{n}s", f"batches_of_{n}")
    body = f"    return [{p}[i:i + {n}] for i in range(0, len({p}), {n})]\n"
    return (name, [p], f"Split `{p}` into consecutive lists of {n} elements (the last may be shorter).", body,
            lambda xs: [xs[i:i + n] for i in range(0, len(xs), n)], lambda: (ints(rng, rng.randint(0, 9)),))


def flatten_once(rng):
    p = pick(rng, "nested", "lists", "groups")
    name = pick(rng, "flatten_one_level", "concat_lists", "join_sublists")
    body = pick(rng, f"    return [x for sub in {p} for x in sub]\n",
                f"    out = []\n    for sub in {p}:\n        out.extend(sub)\n    return out\n")
    return (name, [p], f"Return the elements of the lists in `{p}`, in order, as one flat list.", body,
            lambda xss: [x for s in xss for x in s], lambda: ([ints(rng, rng.randint(0, 3)) for _ in range(rng.randint(0, 4))],))


def rotate(rng):
    a, k = pick(rng, ("items", "k"), ("values", "steps"), ("seq", "n"))
    name = pick(rng, "rotate_left", "shift_left")
    body = f"    if not {a}:\n        return []\n    {k} %= len({a})\n    return {a}[{k}:] + {a}[:{k}]\n"
    return (name, [a, k], f"Return `{a}` rotated left by `{k}` positions (wrapping around).", body,
            lambda xs, s: xs[s % len(xs):] + xs[:s % len(xs)] if xs else [], lambda: (ints(rng, rng.randint(0, 6)), rng.randint(0, 8)))


def differences(rng):
    p = pick(rng, "numbers", "readings", "series")
    name = pick(rng, "pairwise_differences", "successive_deltas", "step_changes")
    body = pick(rng, f"    return [b - a for a, b in zip({p}, {p}[1:])]\n",
                f"    out = []\n    for i in range(1, len({p})):\n        out.append({p}[i] - {p}[i - 1])\n    return out\n")
    return (name, [p], f"Return the differences between consecutive elements of `{p}`.", body,
            lambda xs: [b - a for a, b in zip(xs, xs[1:])], lambda: (ints(rng, rng.randint(0, 7)),))


def first_negative(rng):
    p = pick(rng, "numbers", "balances", "values")
    name = pick(rng, "index_of_first_negative", "first_negative_position")
    body = f"    for i, x in enumerate({p}):\n        if x < 0:\n            return i\n    return -1\n"
    return (name, [p], f"Return the index of the first negative number in `{p}`, or -1 if there is none.", body,
            lambda xs: next((i for i, x in enumerate(xs) if x < 0), -1), lambda: (ints(rng, rng.randint(0, 7), -3, 9),))


def zip_to_dict(rng):
    a, b = pick(rng, ("keys", "values"), ("names", "ages"), ("labels", "counts"))
    name = pick(rng, "pair_up", "zip_into_dict", "build_lookup")
    body = pick(rng, f"    return dict(zip({a}, {b}))\n", f"    return {{k: v for k, v in zip({a}, {b})}}\n")
    def gen():
        ks = rng.sample(string.ascii_lowercase, rng.randint(0, 5))
        return (ks, ints(rng, len(ks)))
    return (name, [a, b], f"Return a dict pairing each element of `{a}` with the element of `{b}` at the same position.",
            body, lambda x, y: dict(zip(x, y)), gen)


def clamp_all(rng):
    lo, hi = sorted(rng.sample(range(-5, 15), 2))
    p = pick(rng, "numbers", "levels", "values")
    name = pick(rng, f"clamp_between_{lo}_and_{hi}".replace("-", "minus_"), "clip_values")
    body = f"    return [min(max(x, {lo}), {hi}) for x in {p}]\n"
    return (name, [p], f"Return `{p}` with every element limited to the range {lo}..{hi}.", body,
            lambda xs: [min(max(x, lo), hi) for x in xs], lambda: (ints(rng, rng.randint(0, 7), -10, 20),))


FAMILIES: list[Family] = [count_char, reverse_words, sum_multiples, above_threshold, cumulative_sum, invert_dict,
                          word_frequencies, group_by_first_letter, merge_counts, factorial_of, digit_total, power_of_two,
                          celsius, sort_by_length, sort_pairs_by_second, top_k, title_words, dedupe, run_length,
                          chunk_list, flatten_once, rotate, differences, first_negative, zip_to_dict, clamp_all]


def generate(n: int, seed: int = 0, cases: int = 5) -> list[Exercise]:
    """`n` exercises (before verification), cycling through the families with a seeded RNG."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        name, params, summary, body, oracle, gen_args = family(rng)
        args_list = [gen_args() for _ in range(cases)]
        out.append(Exercise(name, params, summary, body, [(a, oracle(*a)) for a in args_list], family.__name__))
    return out


CHECKER = """
import json
results = []
for program in json.loads({programs!r}):
    try:
        exec(program, {{"__name__": "exercise"}})
        results.append(True)
    except BaseException:
        results.append(False)
print({marker!r} + json.dumps(results))
"""


def verify(exercises: list[Exercise], progress: bool = True) -> list[bool]:
    """Run each reference solution against its tests in the sandbox; True where every assert passes.

    Exercises go in batches (one sandbox process per batch, each exercise in a fresh namespace); a batch
    that dies without reporting counts as failed throughout."""
    from tqdm import tqdm

    verdicts: list[bool] = []
    for start in tqdm(range(0, len(exercises), BATCH), desc="verify", unit="batch", disable=not progress):
        batch = exercises[start : start + BATCH]
        programs = json.dumps([ex.code() + "\n" + ex.tests() for ex in batch])
        result = run_python(CHECKER.format(programs=programs, marker=VERDICT),
                            limits=Limits(timeout_s=60, cpu_s=60, memory_mb=1024, max_output_bytes=1_000_000))
        found = [line for line in result.stdout.splitlines() if line.startswith(VERDICT)]
        verdicts += json.loads(found[-1][len(VERDICT):]) if found else [False] * len(batch)
    return verdicts
