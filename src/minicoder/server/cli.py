"""`minicoder serve MODEL`: the server under uvicorn. Light to import (argparse only), so building the
`minicoder` command line does not load torch or FastAPI."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..quant.options import add_compression_arguments, compression_config

log = logging.getLogger("minicoder.server")


def configure_serve_parser(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="a model directory (a minicoder checkpoint or any Hugging Face causal LM)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 listens on all interfaces")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MINICODER_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $MINICODER_API_KEY; unset = open)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "transformers"])
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="requests in the running batch (default 16)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="waiting-queue bound; beyond it requests get HTTP 429 (default 256)")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help="memory for the KV cache (default 2 GB)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_compression_arguments(parser)


def run_serve(args: argparse.Namespace):
    import uvicorn

    from ..engine import AsyncEngine, EngineConfig
    from ..errors import MinicoderError
    from .app import ServerSettings, create_app

    for name, minimum in (("port", 0), ("max_num_seqs", 1), ("max_waiting", 1), ("max_model_len", 2)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise MinicoderError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.kv_cache_gb <= 0:
        raise MinicoderError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(dtype=args.dtype, backend=args.backend, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                          kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), **compression_config(args))
    engine = AsyncEngine.from_pretrained(args.model, config)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, ServerSettings(model_name=name, api_key=args.api_key))
    log.info("serving %s as %r on http://%s:%d (backend %s, context %d tokens)%s", args.model, name, args.host,
             args.port, engine.engine.backend, engine.engine.max_request_tokens,
             "; API key required" if args.api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
