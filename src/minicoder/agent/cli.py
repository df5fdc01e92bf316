"""`minicoder agent MODEL|--endpoint URL "question"`: the CodeAct agent in the terminal.

Prints the conversation as it happens (the model's replies, each observation between rules), then the final
answer; a summary line goes to stderr. Light to import: the parser needs argparse only.

    minicoder agent runs/demo/sft/final "What is 2**100?"
    minicoder agent --endpoint http://127.0.0.1:8000/v1 "Use derivative() on x*log(x) at pi" --tools tools.py:derivative
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import MinicoderError


def configure_parser(parser: argparse.ArgumentParser):
    from ..shipped import default_help

    parser.add_argument("model", nargs="?", help="a model directory with a chat template, or use --endpoint; "
                        + default_help("instruct"))
    parser.add_argument("question")
    parser.add_argument("--endpoint", help="an OpenAI-compatible base URL instead of MODEL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("MINICODER_API_KEY"),
                        help="the endpoint's key (default: $MINICODER_API_KEY)")
    parser.add_argument("--model-name", help="the endpoint's model name (default: the first it lists)")
    parser.add_argument("--tools", nargs="+", action="extend", default=[], metavar="SPEC",
                        help="functions the code may call: package.module:function or path/to/file.py:function")
    parser.add_argument("--max-turns", type=int, default=8, help="model replies at most (default 8)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per code execution (default 10)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory per code execution (default 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--quiet", action="store_true", help="print only the final answer")


def run(args: argparse.Namespace) -> int:
    if args.model is not None and args.endpoint is not None:
        raise MinicoderError("give a MODEL directory or --endpoint URL, not both")
    if args.endpoint is None:
        from ..shipped import resolve_model

        args.model = resolve_model(args.model, "instruct")
    if args.model is not None and not Path(args.model).is_dir():
        raise MinicoderError(f"{args.model}: model directory does not exist")
    for flag, value, minimum in (("--max-turns", args.max_turns, 1), ("--memory-mb", args.memory_mb, 64),
                                 ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < minimum:
            raise MinicoderError(f"{flag} must be at least {minimum}, got {value}")
    if args.timeout <= 0 or args.temperature < 0:
        raise MinicoderError("--timeout must be positive and --temperature at least 0")

    import openai

    from ..langchain import ChatMinicoder
    from ..sandbox import Limits
    from .codeact import CodeActAgent
    from .steps import format_question, format_step

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.endpoint:
        chat = ChatMinicoder(base_url=args.endpoint, api_key=args.api_key, model=args.model_name, **sampling)
    else:
        chat = ChatMinicoder(model=args.model, **sampling)
    limits = Limits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout)), memory_mb=args.memory_mb)
    agent = CodeActAgent(chat, tools=args.tools, max_turns=args.max_turns, limits=limits)
    start = time.monotonic()
    if not args.quiet:
        print(format_question(args.question), flush=True)
    steps = []
    try:
        for step in agent.stream(args.question):
            steps.append(step)
            if not args.quiet:
                print(format_step(step), flush=True)
    except openai.APIConnectionError as e:
        raise MinicoderError(f"cannot reach --endpoint {args.endpoint}: {e}") from None
    except openai.APIStatusError as e:
        raise MinicoderError(f"--endpoint {args.endpoint} answered HTTP {e.status_code}: {e.message}") from None
    runs = sum(step.kind == "observation" for step in steps)
    seconds = time.monotonic() - start
    if steps and steps[-1].is_final_answer:
        if args.quiet:
            print(steps[-1].text.strip())
        print(f"agent: final answer after {steps[-1].turn} turn(s), {runs} code run(s), {seconds:.1f} s",
              file=sys.stderr)
        return 0
    print(f"agent: no final answer within --max-turns {args.max_turns} ({runs} code run(s), {seconds:.1f} s)",
          file=sys.stderr)
    return 1
