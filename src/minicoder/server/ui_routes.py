"""The web UI's routes: the page at `GET /` for browsers, its static files under `/ui/`, and the
machine-readable server description that `GET /` returns to everyone else.

    install_ui(app)      # in create_app, after the API routers

`GET /` is content-negotiated: a browser (its `Accept` prefers `text/html`) gets the page; curl, scripts
and `Accept: application/json` get `server_info()` as JSON. `POST /` (the prompt + history chat route)
is another method on the same path and is untouched. The page itself needs no API key (a browser cannot
send one on navigation); the JSON, like every API route, does when the server has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"
INDEX = UI_DIR / "index.html"
# What the model panel shows when the model directory has no generation_config.json: the API's own defaults.
API_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def wants_html(accept: str) -> bool:
    """True when an Accept header ranks text/html above application/json (browsers do; curl sends */*)."""
    quality = {}
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    html = quality.get("text/html", 0.0)
    return html > 0 and html >= quality.get("application/json", 0.0)


def install_ui(app: FastAPI):
    server = app.state.server
    check_key, bearer = server.api_key_checker(), HTTPBearer(auto_error=False)

    @app.get("/", tags=["ui"], summary="The web UI (browsers) or this server's description (JSON)")
    async def index(request: Request):
        if wants_html(request.headers.get("accept", "")):
            return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
        await check_key(await bearer(request))  # called, not a dependency: the page above stays open
        return JSONResponse(server_info(server, app))

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")


def server_info(server, app: FastAPI) -> dict:
    """What the model panel shows: the served model, its training, its sampling defaults, the server's limits."""
    engine = server.engine
    path = engine.model_path
    config = _read_json(path / "config.json")
    training = _read_json(path / "minicoder.json")
    generation = _read_json(path / "generation_config.json")
    dtype = engine.dtype  # resolved: `auto` is bf16 or float32 by now
    from_model = {k: generation[k] for k in GENERATION_CONFIG_KEYS if k in generation}
    return {
        "object": "server",
        "name": "minicoder",
        "ui": "/",
        "model": {
            "id": server.settings.model_name,
            "path": str(path.resolve()),
            "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "parameters": engine.num_parameters,
            "context_length": server.context,
            "dtype": str(dtype).removeprefix("torch."),
            "quantization": config.get("quantization_config", {}).get("quant_method")
            if isinstance(config.get("quantization_config"), dict) else None,
            "backend": engine.backend,
            "vocab_size": engine.vocab_size,
            "fill_in_the_middle": engine.prompts.fim_format is not None,
            "training": training or None,
        },
        "sampling_defaults": {**API_SAMPLING_DEFAULTS, **from_model},
        "sampling_defaults_source": "the model's generation_config.json" if from_model
        else "the API's defaults (the model's generation_config.json sets none)",
        "limits": {"max_num_seqs": engine.config.max_num_seqs, "max_waiting": engine.config.max_waiting,
                   "kv_cache_blocks": engine.stats().total_blocks},
        "api_key_required": server.settings.api_key is not None,
        "routes": sorted(f"{method.upper()} {path}" for path, methods in app.openapi()["paths"].items()
                         for method in methods),
    }


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: the panel shows what it has
        return {}
    return value if isinstance(value, dict) else {}
