"""The `--quantize` and `--kv-cache-dtype` options shared by serve, generate, chat and eval (argparse only:
building the command line must not import torch)."""

from __future__ import annotations

import argparse

QUANTIZE_CHOICES = ("int8", "int4")
KV_CACHE_DTYPE_CHOICES = ("auto", "int8", "int4")


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="quantize the weights at load time, round to nearest (int8 per channel, int4 group-wise)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                        help="int8/int4: quantize keys and values per token and head (2x/4x the tokens of "
                             "16-bit per byte); default auto = the model's dtype")


def compression_config(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed options."""
    return {"quantize": getattr(args, "quantize", None), "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto")}
