"""The sampling settings HumanEval is reported with, and a run over several of them.

Papers report pass@1 greedy, pass@1 at T=0.2 and pass@10 at T=0.8 side by side (the Codex paper found
T~0.2 best for pass@1 and T~0.8 for pass@10/100; a single T=0.8 run understates weak models). The
`standard` protocol runs all three, each in its own subfolder of --out with its samples and verdicts;
`single` is one run at the --temperature / --n-samples given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .humaneval import generate_samples, score_samples


@dataclass(frozen=True)
class Setting:
    name: str  # subfolder and score-name suffix
    n: int
    temperature: float
    ks: tuple[int, ...]


def standard_settings(n: int = 20) -> list[Setting]:
    return [Setting("greedy", 1, 0.0, (1,)), Setting("t0.2", n, 0.2, (1,)), Setting("t0.8", n, 0.8, (1, 10))]


def label(setting: Setting, k: int) -> str:
    if setting.temperature == 0:
        return f"pass@{k} greedy"
    return f"pass@{k} T={setting.temperature:g} n={setting.n}"


def run_settings(completer, out: Path, settings: list[Setting], limit: int | None, progress: bool = True) -> dict:
    """Generate and score each setting; scores keyed like `pass@1 greedy`, `pass@10 T=0.8 n=20`."""
    scores: dict = {}
    for s in settings:
        folder = out / s.name
        folder.mkdir(parents=True, exist_ok=True)
        samples = generate_samples(completer, folder / "samples.jsonl", s.n, s.temperature, limit, progress=progress)
        result = score_samples(samples, ks=s.ks)
        for k in s.ks:
            if f"pass@{k}" in result:
                scores[label(s, k)] = result[f"pass@{k}"]
        scores["problems"] = result["problems"]
        print(f"HumanEval {s.name}: " + ", ".join(f"pass@{k} {result[f'pass@{k}']:.4f}" for k in s.ks if f"pass@{k}" in result)
              + f" ({result['samples']} samples) -> {samples.with_name(samples.name + '_results.jsonl')}")
    return scores
