"""`minicoder chat MODEL`: talk to a checkpoint in the terminal (like minimind's `model_chat.py`).

Two modes, as the seed's pretrain / SFT switch:

  raw    each line is a prompt the model continues (pretrained checkpoints); no history
  chat   turns go through the chat template; the history is kept and its oldest turns dropped so the
         prompt fits --max-seq-len tokens (instruction-tuned checkpoints)

`--mode auto` (the default) picks chat for a model whose minicoder.json says `"stage": "sft"`, and for
a model from elsewhere (no minicoder.json) whose tokenizer has a chat template and whose name says
instruct/chat; raw otherwise. minimind's defaults: max_seq_len 256, max_new_tokens 64, temperature
0.75, top_p 0.90.

In the REPL, /reset clears the history and /exit (or end of input) quits. Ctrl-C stops a reply, and
quits at the prompt. Replies stream from the engine (no sampling loop here: principle 3 of docs/ARCHITECTURE.md).

    python -m minicoder.chat runs/sft/final --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .errors import MinicoderError

if TYPE_CHECKING:
    from .engine import Engine

COMMANDS = "/reset clears the history, /exit quits"


@dataclass
class ChatOptions:
    mode: str = "chat"  # "chat" or "raw"
    max_seq_len: int = 256  # prompt tokens kept (the oldest history goes first)
    max_new_tokens: int = 64
    temperature: float = 0.75
    top_p: float = 0.90
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    system: str | None = None  # a system message (chat mode); None: the template's default


@dataclass
class ChatSession:
    """A conversation with the engine: builds each prompt, streams the reply, keeps the history."""

    engine: Engine
    options: ChatOptions
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) turns
    turns: int = 0

    def reset(self):
        self.history.clear()

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for `text`: raw text, or the conversation so far plus `text` in the chat template,
        dropping the oldest turns (then the oldest tokens) to fit max_seq_len."""
        limit = min(self.options.max_seq_len, self.engine.max_request_tokens - 1)
        if self.options.mode == "raw":
            return self.engine.prompts.completion(text)[-limit:]
        history = list(self.history)
        while True:
            ids = self.engine.prompts.chat(self._messages(history, text))
            if len(ids) <= limit or not history:
                return ids[-limit:]
            history.pop(0)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the model's answer to `text`; in chat mode the finished turn joins the history."""
        from .engine import SamplingParams

        o = self.options
        params = SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
                                top_k=o.top_k, repetition_penalty=o.repetition_penalty,
                                seed=None if o.seed is None else o.seed + self.turns)
        self.turns += 1
        out = None
        for out in self.engine.stream(self.prompt_ids(text), params):
            if out.delta_text:
                yield out.delta_text
        if o.mode == "chat" and out is not None:
            self.history.append((text, out.text))

    def _messages(self, history: list[tuple[str, str]], text: str) -> list[dict]:
        messages = [{"role": "system", "content": self.options.system}] if self.options.system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*messages, {"role": "user", "content": text}]


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool = False):
    """Read lines from stdin, write streamed replies to stdout, until /exit or the end of input.

    `interactive` reads with `input()` (line editing); otherwise each line read is echoed after the prompt
    so that a piped transcript reads as a conversation."""
    you, bot = _markers(stdout)
    while True:
        try:
            if interactive:
                line = input(you)
            else:
                stdout.write(you)
                stdout.flush()
                line = stdin.readline()
                if not line:  # end of input
                    stdout.write("\n")
                    return
                stdout.write(line if line.endswith("\n") else line + "\n")
        except EOFError:
            stdout.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            stdout.write(f"(unknown command {text}; {COMMANDS})\n")
            continue
        stdout.write(bot)
        try:
            for delta in session.reply(text):
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C during a reply stops it (the engine request is cancelled)
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()


def pick_mode(model_dir: Path, tokenizer, requested: str = "auto") -> tuple[str, str]:
    """(mode, why) for `--mode requested`."""
    if requested != "auto":
        return requested, "--mode"
    info_file = model_dir / "minicoder.json"
    if info_file.is_file():
        try:
            stage = json.loads(info_file.read_text()).get("stage")
        except (json.JSONDecodeError, AttributeError):
            stage = None
        return ("chat" if stage == "sft" else "raw"), f"minicoder.json: stage {stage!r}"
    name = model_dir.resolve().name.lower()
    if getattr(tokenizer, "chat_template", None) and ("instruct" in name or "chat" in name):
        return "chat", "an instruct model with a chat template"
    return "raw", "no minicoder.json saying stage 'sft'"


def _markers(stdout: TextIO) -> tuple[str, str]:
    """minimind's 🤔 / 🤖 prompts where the output can show them."""
    try:
        "🤔🤖".encode(getattr(stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "> ", ""
    return "🤔: ", "🤖: "


# --- `minicoder chat` ---------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser):
    d = ChatOptions()
    from .shipped import default_help

    parser.add_argument("model", nargs="?", help="a checkpoint, final/, or a Hugging Face model; " + default_help("instruct"))
    parser.add_argument("--mode", default="auto", choices=["auto", "chat", "raw"],
                        help="chat: chat template + history (SFT models); raw: continue each line (pretrained); "
                             "auto (default): from minicoder.json's stage")
    parser.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                        help=f"prompt tokens kept, oldest history dropped first (default {d.max_seq_len})")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--system", help="a system message for chat mode")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "transformers"])
    from .engine.options import add_engine_arguments
    from .quant.options import add_compression_arguments
    from .speculation_options import add_speculation_arguments

    add_compression_arguments(parser)
    add_speculation_arguments(parser)
    add_engine_arguments(parser)


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from .engine import Engine, EngineConfig, SamplingParams  # torch loads here, not when the CLI is built

    if args.max_seq_len < 1:
        raise MinicoderError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    options = ChatOptions(max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, system=args.system)
    try:
        SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                       top_k=options.top_k, repetition_penalty=options.repetition_penalty).validate()
    except ValueError as e:
        raise MinicoderError(str(e).replace("max_new_tokens", "--max-new-tokens")) from None
    from .engine.options import engine_options
    from .quant.options import compression_config
    from .shipped import resolve_model
    from .speculation_options import speculation_config

    args.model = resolve_model(args.model, "instruct")
    engine = Engine(args.model, EngineConfig(backend=args.backend, max_num_seqs=1, **compression_config(args),
                                             **engine_options(args), **speculation_config(args)))
    options.mode, why = pick_mode(Path(args.model), engine.tokenizer, args.mode)
    if options.system and options.mode == "raw":
        raise MinicoderError("--system needs chat mode (--mode chat)")
    print(f"minicoder chat: {args.model} in {options.mode} mode ({why}); {engine.runtime_summary()}; {COMMANDS}",
          file=sys.stderr)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    repl(ChatSession(engine, options), stdin, stdout, interactive)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minicoder chat", description="Talk to a model in the terminal.")
    configure_parser(parser)
    try:
        return run(parser.parse_args(argv))
    except MinicoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
