"""The HTTP server: the OpenAI-compatible API, the prompt + history chat route (`POST /`), health and metrics (FastAPI + uvicorn).

    from minicoder.server import ServerSettings, create_app      # the app (imports torch and FastAPI)
    from minicoder.server.cli import configure_serve_parser, run_serve   # `minicoder serve` (light)
"""

from .cli import configure_serve_parser, run_serve

__all__ = ["ServerSettings", "configure_serve_parser", "create_app", "run_serve"]


def __getattr__(name: str):  # the app's modules load on first use, so the command line stays fast
    if name in ("ServerSettings", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
