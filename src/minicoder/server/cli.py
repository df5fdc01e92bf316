"""`minicoder serve MODEL`: the server under uvicorn. Light to import (argparse only), so building the
`minicoder` command line does not load torch or FastAPI."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .limits import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS
from ..engine.options import DEFAULT_BATCHED_TOKENS, add_engine_arguments, engine_options
from ..quant.options import add_compression_arguments, compression_config
from ..speculation_options import add_speculation_arguments, speculation_config

log = logging.getLogger("minicoder.server")


def configure_serve_parser(parser: argparse.ArgumentParser):
    from ..shipped import default_help

    parser.add_argument("model", nargs="?", help="a minicoder checkpoint or any Hugging Face causal LM; "
                        + default_help("instruct"))
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 listens on all interfaces")
    parser.add_argument("--port", type=int, default=8000)
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", type=Path, metavar="FILE",
                     help="require `Authorization: Bearer KEY`, KEY being this file's first line")
    key.add_argument("--api-key", help="the same with KEY itself; other local users can read it in the process list, "
                     "so prefer --api-key-file or $MINICODER_API_KEY (used when neither flag is given)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "transformers"])
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="requests in the running batch (default 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_BATCHED_TOKENS,
                        help="tokens one engine step computes, decodes plus prefill chunks (chunked prefill): larger "
                             "prefills a long prompt in fewer steps (lower time to first token), smaller keeps other "
                             "streams' decode steps short while it prefills (default %d)" % DEFAULT_BATCHED_TOKENS)
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="waiting-queue bound; beyond it requests get HTTP 429 (default 256)")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help="memory for the KV cache (default 2 GB)")
    parser.add_argument("--repo", metavar="DIR", help="index this repository (BM25 over code chunks, refreshed when "
                        "files change): its most relevant snippets go into fill-in-the-middle prompts")
    parser.add_argument("--repo-context-tokens", type=int, default=1024,
                        help="most prompt tokens the --repo snippets take (default 1024, at most half the context)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / (1 << 20),
                        help="larger request bodies get HTTP 413 (default %(default)g)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections beyond this get HTTP 503 (default %(default)d)")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a client may take to send its request headers (default %(default)g)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_compression_arguments(parser)
    add_speculation_arguments(parser)
    add_engine_arguments(parser)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or $MINICODER_API_KEY (in that order); None = no key."""
    from ..errors import MinicoderError

    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MinicoderError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise MinicoderError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    if args.api_key is not None:
        if not args.api_key.strip():
            raise MinicoderError("--api-key is empty")
        log.warning("--api-key is readable by every local user in the process list; "
                    "prefer --api-key-file or $MINICODER_API_KEY")
        return args.api_key
    return os.environ.get("MINICODER_API_KEY") or None


def run_serve(args: argparse.Namespace):
    import uvicorn

    from ..engine import AsyncEngine, EngineConfig
    from ..errors import MinicoderError
    from .app import ServerSettings, create_app
    from .limits import uvicorn_config

    for name, minimum in (("port", 0), ("max_num_seqs", 1), ("max_waiting", 1), ("max_model_len", 2),
                          ("max_connections", 1), ("max_num_batched_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise MinicoderError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.repo is not None and not Path(args.repo).expanduser().is_dir():
        raise MinicoderError(f"--repo {args.repo}: not a directory")
    if args.repo_context_tokens < 0:
        raise MinicoderError(f"--repo-context-tokens must be at least 0, got {args.repo_context_tokens}")
    for name in ("kv_cache_gb", "max_body_mb", "header_timeout"):
        if not 0 < getattr(args, name) < float("inf"):
            raise MinicoderError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = api_key(args)
    config = EngineConfig(backend=args.backend, **engine_options(args), max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), **compression_config(args),
                          **speculation_config(args))
    from ..shipped import resolve_model, served_name

    args.model = resolve_model(args.model, "instruct")
    engine = AsyncEngine.from_pretrained(args.model, config)
    name = args.served_model_name or served_name(Path(args.model))
    app = create_app(engine, ServerSettings(model_name=name, api_key=key, repo=args.repo,
                                            repo_context_tokens=args.repo_context_tokens,
                                            max_body_bytes=int(args.max_body_mb * (1 << 20))))
    log.info("serving %s as %r on http://%s:%d (backend %s, context %d tokens)%s", args.model, name, args.host,
             args.port, engine.backend, engine.max_request_tokens,
             "; API key required" if key else "")
    log.info("%s", engine.engine.runtime_summary())
    log.info("web UI: http://%s:%d/ (open it in a browser)", args.host, args.port)
    uvicorn.Server(uvicorn_config(app, header_timeout=args.header_timeout, max_connections=args.max_connections,
                                  host=args.host, port=args.port, log_level=args.log_level)).run()
