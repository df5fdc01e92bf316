"""`minicoder ui --endpoint URL`: the web UI for a server that is already running elsewhere (another
minicoder, or any OpenAI-compatible server), the way `lmdeploy serve gradio URL` fronts a server.

    minicoder ui --endpoint http://127.0.0.1:8000 --port 7860

It serves the same page as `minicoder serve` and forwards every other request to the endpoint, streams
included, so the page talks to one origin (no CORS setup on the server) and closing a stream in the
browser closes it upstream (which cancels the generation there). Light to import: FastAPI, httpx and
uvicorn load only when it runs.
"""


# No `from __future__ import annotations`: FastAPI must see the real `Request` class of the route below.
import argparse
import os
from urllib.parse import urlsplit

from ..errors import MinicoderError

# Response headers passed back from the endpoint (hop-by-hop ones and lengths are the proxy's own).
FORWARDED_RESPONSE_HEADERS = ("content-type", "cache-control", "retry-after", "www-authenticate", "x-request-id")


def configure_ui_parser(parser: argparse.ArgumentParser):
    parser.add_argument("--endpoint", required=True,
                        help="the server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 listens on all interfaces")
    parser.add_argument("--port", type=int, default=7860, help="default 7860")
    parser.add_argument("--api-key", default=os.environ.get("MINICODER_API_KEY"),
                        help="sent as `Authorization: Bearer KEY` when the page sends none (default: $MINICODER_API_KEY)")


def normalize_endpoint(url: str) -> str:
    """http(s)://host[:port][/prefix] without a trailing slash or /v1 (the page adds v1/... itself)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MinicoderError(f"--endpoint must be an http:// or https:// URL such as http://127.0.0.1:8000, got {url!r}")
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}"


def create_proxy_app(endpoint: str, api_key: str | None = None):
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    from .errors import error_response
    from .ui_routes import INDEX, UI_DIR, wants_html

    base = normalize_endpoint(endpoint)
    client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))  # a reply may stream for minutes

    @asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="minicoder ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

    @app.api_route("/", methods=methods)
    @app.api_route("/{path:path}", methods=methods)
    async def forward(request: Request, path: str = ""):
        if path == "" and request.method == "GET" and wants_html(request.headers.get("accept", "")):
            return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type", "authorization")}
        if api_key and "authorization" not in {k.lower() for k in headers}:
            headers["Authorization"] = f"Bearer {api_key}"
        upstream = client.build_request(request.method, f"{base}/{path}", params=request.query_params,
                                        headers=headers, content=await request.body())
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            return error_response(502, f"cannot reach the server at {base}: {type(e).__name__}: {e or 'no answer'}",
                                  type="upstream_error", code="upstream_unreachable")

        async def body():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                pass  # the endpoint went away mid-stream: the page sees the stream end without [DONE]
            finally:
                await response.aclose()  # also when the browser disconnects: the endpoint cancels the generation

        kept = {k: v for k, v in response.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
        return StreamingResponse(body(), status_code=response.status_code, headers=kept)

    return app


def run_ui(args: argparse.Namespace):
    import logging

    import httpx
    import uvicorn

    if not 0 <= args.port < 65536:
        raise MinicoderError(f"--port must be between 0 and 65535, got {args.port}")
    base = normalize_endpoint(args.endpoint)
    log = logging.getLogger("minicoder.ui")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        httpx.get(f"{base}/health", timeout=3.0)
    except httpx.HTTPError as e:
        log.warning("%s does not answer yet (%s); the page will say so until it does", base, e)
    app = create_proxy_app(base, args.api_key)
    log.info("web UI for %s at http://%s:%d/", base, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
