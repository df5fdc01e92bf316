"""The `--speculative ngram` options shared by serve, generate and chat (argparse only: building the
command line must not import torch). vLLM's names: num_speculative_tokens, prompt_lookup_min / _max."""

from __future__ import annotations

import argparse

from .errors import MinicoderError

SPECULATIVE_METHODS = ("ngram",)


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative", choices=SPECULATIVE_METHODS,
                        help="ngram: prompt-lookup speculative decoding (drafts copied from the prompt and output, "
                             "verified in one forward; greedy output does not change, sampled output keeps its "
                             "distribution; requests with penalties or a grammar do not speculate)")
    parser.add_argument("--num-speculative-tokens", type=int, metavar="K",
                        help="with --speculative: most draft tokens verified per request and step (default 5)")
    parser.add_argument("--prompt-lookup-min", type=int, metavar="N",
                        help="with --speculative ngram: shortest n-gram matched (default 2)")
    parser.add_argument("--prompt-lookup-max", type=int, metavar="N",
                        help="with --speculative ngram: longest n-gram matched, tried first (default 4)")


def speculation_config(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed options; MinicoderError naming the flag when one is bad."""
    tuning = {name: getattr(args, name, None) for name in
              ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")}
    given = {name: value for name, value in tuning.items() if value is not None}
    method = getattr(args, "speculative", None)
    if method is None:
        if given:
            raise MinicoderError(f"--{next(iter(given)).replace('_', '-')} needs --speculative ngram")
        return {}
    from .engine.speculation import SpeculativeConfig

    config = SpeculativeConfig(method=method, **given)
    try:
        config.validate()
    except ValueError as e:
        message = str(e)
        for name in tuning:
            message = message.replace(name, f"--{name.replace('_', '-')}")
        raise MinicoderError(message) from None
    return {"speculative": config}
