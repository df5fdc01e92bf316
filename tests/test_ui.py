"""The web UI's server side, without a browser: `GET /` negotiation (page for browsers, JSON for the rest,
`POST /` untouched), the API key on the JSON but not on the page, every file the page loads shipped and
served, the model description (minicoder.json of a real training run), and `minicoder ui`'s forwarding
to a real uvicorn server, streams and cancellation included. The browser itself: test_ui_browser.py."""

from __future__ import annotations

import json
import re
import socket
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from minicoder.engine import AsyncEngine, Engine, EngineConfig
from minicoder.server import ServerSettings, create_app
from minicoder.server.ui_proxy import create_proxy_app, normalize_endpoint
from minicoder.server.ui_routes import UI_DIR, wants_html

from conftest import run_cli, save_tiny_llama, serve_in_thread

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), context=2048)


def make_app(model_dir, **settings):
    return create_app(AsyncEngine(Engine(model_dir, EngineConfig(max_num_seqs=2))),
                      ServerSettings(model_name="tiny", **settings))


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(make_app(model_dir)) as c:
        yield c


# --- GET / ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept, html", [
    (BROWSER_ACCEPT, True), ("text/html", True), ("*/*", False), ("", False), ("application/json", False),
    ("application/json, text/html;q=0.5", False), ("text/html;q=0.2, application/json;q=0.1", True),
    ("text/html;q=0", False)])
def test_accept_negotiation(accept, html):
    assert wants_html(accept) is html


def test_browsers_get_the_page_and_clients_get_json(client):
    page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>minicoder</title>" in page.text and 'src="ui/js/main.js"' in page.text
    for accept in ("application/json", "*/*"):  # curl sends */*
        info = client.get("/", headers={"Accept": accept})
        assert info.status_code == 200 and info.headers["content-type"] == "application/json"
        model = info.json()["model"]
        assert model["id"] == "tiny" and model["context_length"] == 2048 and model["dtype"] == "float32"
        assert model["parameters"] == sum(p.numel() for p in client.app.state.server.engine.engine.runner.model.parameters())
        assert model["fill_in_the_middle"] is True and model["training"] is None
        assert info.json()["sampling_defaults"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    assert {"POST /", "GET /", "POST /v1/chat/completions"} <= set(info.json()["routes"])


def test_post_root_chat_route_is_unchanged(client):
    r = client.post("/", json={"prompt": "hi", "history": [], "max_length": 4})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"} and body["history"][0][0] == "hi"


def test_api_key_guards_the_json_not_the_page(model_dir):
    with TestClient(make_app(model_dir, api_key="sekrit")) as c:
        assert c.get("/", headers={"Accept": BROWSER_ACCEPT}).status_code == 200
        assert c.get("/ui/js/main.js").status_code == 200
        denied = c.get("/", headers={"Accept": "application/json"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        ok = c.get("/", headers={"Accept": "application/json", "Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["api_key_required"] is True


def test_model_description_reads_the_training_run(tiny_trained):
    """minicoder.json, as `minicoder pretrain` wrote it, reaches the model panel's data."""
    with TestClient(create_app(AsyncEngine(Engine(tiny_trained / "final")))) as c:
        training = c.get("/", headers={"Accept": "application/json"}).json()["model"]["training"]
    assert training["stage"] == "pretrain" and training["steps"] == 8 and training["tokens_trained"] > 0


def test_sampling_defaults_come_from_generation_config(tmp_path):
    model = save_tiny_llama(tmp_path / "m", context=128)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.2, "top_p": 0.95}))
    with TestClient(make_app(model)) as c:
        info = c.get("/", headers={"Accept": "application/json"}).json()
    assert info["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0}
    assert "generation_config.json" in info["sampling_defaults_source"]


# --- the page's files ---------------------------------------------------------------------------------------
def referenced_files() -> set[str]:
    """Every file the page loads: links and scripts in index.html, and the JS modules' imports."""
    found = set(re.findall(r'(?:href|src)="ui/([^"]+)"', (UI_DIR / "index.html").read_text()))
    pending = [f for f in found if f.endswith(".js")]
    while pending:
        module = UI_DIR / pending.pop()
        for target in re.findall(r'^import .*? from "(\.[^"]+)";', module.read_text(), re.M):
            path = (module.parent / target).resolve().relative_to(UI_DIR.resolve()).as_posix()
            if path not in found:
                found.add(path)
                pending.append(path)
    return found


def test_every_file_the_page_loads_is_served_offline(client):
    files = referenced_files()
    assert {"js/main.js", "js/chat.js", "vendor/marked.esm.js", "vendor/purify.es.js", "vendor/highlight.min.js",
            "vendor/hljs-github-dark.min.css"} <= files
    for name in files:
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200, name
        kind = "javascript" if name.endswith(".js") else "css"
        assert kind in r.headers["content-type"], (name, r.headers["content-type"])
    for path in UI_DIR.rglob("*"):  # nothing fetched from elsewhere at run time
        if path.suffix in (".js", ".html", ".css") and "vendor" not in path.parts:
            assert not re.search(r"https?://", path.read_text()), f"{path} refers to the network"


def test_package_data_ships_every_ui_file():
    """The wheel carries the page: pyproject's package-data patterns cover every file under server/ui/."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minicoder"]
    package = UI_DIR.parents[1]
    for path in UI_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(package).as_posix()
            assert any(fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), relative
    assert (UI_DIR / "vendor" / "LICENSE.marked").is_file() and (UI_DIR / "vendor" / "LICENSE.dompurify").is_file()


# --- minicoder ui --endpoint -----------------------------------------------------------------------------------
def metrics_value(url: str, name: str, labels: str = "") -> float:
    pattern = rf"^{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$"
    return float(re.search(pattern, httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_proxy_serves_the_page_and_forwards_streams_and_cancellation(model_dir):
    with serve_in_thread(make_app(model_dir)) as upstream, serve_in_thread(create_proxy_app(upstream + "/v1")) as ui:
        page = httpx.get(f"{ui}/", headers={"Accept": BROWSER_ACCEPT})
        assert page.status_code == 200 and "<title>minicoder</title>" in page.text
        assert httpx.get(f"{ui}/ui/js/api.js").status_code == 200
        assert httpx.get(f"{ui}/", headers={"Accept": "application/json"}).json()["model"]["id"] == "tiny"
        bad = httpx.post(f"{ui}/v1/chat/completions", json={"messages": [], "max_tokens": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"  # the endpoint's own answer

        aborted = metrics_value(upstream, "minicoder_requests_total", 'finish_reason="abort"')
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1800, "ignore_eos": True,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{ui}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream"), r.read()
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: {")
                if events == 5:
                    assert metrics_value(upstream, "minicoder_num_requests_running") == 1
                    break  # the browser's Stop: the connection closes here
        deadline = time.time() + 10
        while metrics_value(upstream, "minicoder_num_requests_running") != 0:
            assert time.time() < deadline, "closing the stream at the proxy did not cancel the generation upstream"
            time.sleep(0.05)
        # Cancelled (1800 tokens were asked for), not run to its end for nobody.
        assert metrics_value(upstream, "minicoder_requests_total", 'finish_reason="abort"') == aborted + 1


def test_proxy_says_when_the_endpoint_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with TestClient(create_proxy_app(f"http://127.0.0.1:{port}")) as c:
        r = c.get("/v1/models")
    assert r.status_code == 502 and "cannot reach the server" in r.json()["error"]["message"]


@pytest.mark.parametrize("url, base", [("http://h:8000", "http://h:8000"), ("http://h:8000/v1/", "http://h:8000"),
                                       ("https://h/prefix/v1", "https://h/prefix")])
def test_endpoint_urls(url, base):
    assert normalize_endpoint(url) == base


def test_ui_command_rejects_a_bad_endpoint():
    proc = run_cli("ui", "--endpoint", "localhost:8000")
    assert proc.returncode == 2 and "error: --endpoint must be an http:// or https:// URL" in proc.stderr
