"""The HTTP server's app factory: middleware, error handlers, lifespan, health and metrics, and one router per
API family over the shared generation layer (serving.py).

    engine = AsyncEngine.from_pretrained("runs/sft/final")
    app = create_app(engine, ServerSettings(model_name="final"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `minicoder serve MODEL` does

Every route generates through the engine (docs/ARCHITECTURE.md principle 3):

  GET  /, /ui/...             the web UI (browsers), the server's description (JSON)        ui_routes.py
  POST /                      prompt + history chat (the DeepSeek-Coder FastAPI tutorial)    history_chat.py
  GET  /v1/models, POST /v1/completions, /v1/chat/completions   the OpenAI API             openai_routes.py
  POST /infill                llama.cpp's fill-in-the-middle (llama.vim, llama.vscode)       llamacpp.py
  /api/*                      the Ollama API                                                 ollama.py
  GET  /v1/health, Tabby's `segments` body on /v1/completions                               tabby.py
  POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer routes               tokenizer_routes.py
  GET  /health, GET /metrics  liveness; Prometheus text                                      here
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import PlainTextResponse

from ..engine import AsyncEngine
from . import history_chat, openai_routes
from .clients import include_client_routers
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .serving import Server, ServerSettings
from .ui_routes import install_ui

__all__ = ["ServerSettings", "create_app"]


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app over `engine`. The app owns the engine: it is closed when the app shuts down."""
    settings = settings or ServerSettings()
    server = Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sampler = asyncio.create_task(server.sample_metrics())
        try:
            yield
        finally:
            sampler.cancel()
            server.fim.close()
            await engine.close()

    # With an API key the schema is served behind it, and the HTML docs (which a browser cannot load
    # with a bearer header) are off.
    open_docs = settings.api_key is None
    app = FastAPI(title="minicoder", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if open_docs else None, redoc_url="/redoc" if open_docs else None,
                  openapi_url="/openapi.json" if open_docs else None,
                  description="A code LLM behind an OpenAI-compatible API, editor and harness APIs, and the prompt + history chat route.")
    app.state.server = server
    install_ui(app)  # GET /: the web UI for browsers, this server's description as JSON otherwise
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.include_router(monitoring_routes(server))
    app.include_router(history_chat.router(server))
    app.include_router(openai_routes.router(server))
    include_client_routers(app, server)
    if not open_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(server.api_key_checker())])
        async def openapi() -> dict:
            return app.openapi()
    return app


def monitoring_routes(server: Server) -> APIRouter:
    router = APIRouter(tags=["monitoring"])

    @router.get("/health", summary="Liveness")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(server.engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
