"""`--dtype` and `--compile`, shared by serve, generate, chat and eval (argparse only: building the command
line must not import torch), and how "auto" resolves on this machine.

--dtype auto: bf16 where the hardware computes it natively (a CPU with AVX-512 BF16 or AMX, a CUDA GPU with
bf16), fp32 elsewhere (without those instructions PyTorch emulates bf16 matmuls, slower than fp32).
--compile auto: compile the decode step with torch.compile when it works, else decode eagerly with a notice;
on: the same but a failure is an error; off: eager. The default is auto, except for `generate` (one request
does not repay tens of seconds of compiling: off); $MINICODER_COMPILE overrides it (the test suite sets it to
off so tiny models start in a second).
"""

from __future__ import annotations

import argparse
import os

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
COMPILE_CHOICES = ("auto", "on", "off")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and compute: auto (default) = bf16 where the CPU has AVX-512 BF16 or AMX "
                             "(or a CUDA GPU with bf16), else fp32")


# Tokens one engine step computes (chunked prefill): a prompt longer than this is prefilled over several steps.
DEFAULT_BATCHED_TOKENS = 256


def add_engine_arguments(parser: argparse.ArgumentParser, compile_default: str = "auto") -> None:
    """--dtype and --compile, for commands that generate through the engine."""
    add_dtype_argument(parser)
    default = os.environ.get("MINICODER_COMPILE", compile_default)
    parser.add_argument("--compile", default=default, choices=COMPILE_CHOICES,
                        help="torch.compile the decode step at start-up: auto = when it works, else eager with a "
                             f"notice; on = fail if it cannot; off = eager (default {default})")


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed options."""
    options = {"dtype": DTYPE_NAMES.get(args.dtype, args.dtype)}
    if hasattr(args, "compile"):
        options["compile"] = args.compile
    return options


def resolve_dtype(name: str):
    """(torch dtype, why) for a --dtype value or a torch dtype."""
    import torch

    from .. import hardware

    if isinstance(name, torch.dtype):
        return name, "as configured"
    name = DTYPE_NAMES.get(name, name)
    if name != "auto":
        return getattr(torch, name), "as configured"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "CUDA GPU with bf16"
    if hardware.cpu_has_fast_bf16():
        return torch.bfloat16, f"{' + '.join(hardware.fast_bf16_features()) or 'fast bf16'} detected"
    return torch.float32, "this CPU has no AVX-512 BF16 or AMX: bf16 would be emulated"


def dtype_label(dtype) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).removeprefix("torch."), str(dtype))
