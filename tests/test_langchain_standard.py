"""LangChain's own conformance suites (`langchain-tests`) for ChatMinicoder: the unit suite (no model needed),
and the integration suite against a tiny random Llama run by the engine in-process.

What the suite skips by its own switches, and why (minicoder's chat model does not claim these):
tool calling and structured output (ChatMinicoder has no `bind_tools` / `with_structured_output`; the server
enforces `tools` and `response_format` for OpenAI clients, tests/test_structured_output.py), image / audio / PDF inputs (a text model),
a per-call model override for an in-process model (one instance, one loaded model), VCR cassettes (no HTTP)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from minicoder.engine import AsyncEngine, Engine
from minicoder.langchain import ChatMinicoder
from minicoder.server import ServerSettings, create_app

from conftest import save_tiny_llama, serve_in_thread


@functools.cache
def tiny_model_dir() -> str:
    """The suites read their parameters from class properties, not fixtures: one model for the session."""
    root = Path(tempfile.mkdtemp(prefix="minicoder-lc-standard-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return str(save_tiny_llama(root / "tiny", context=1024))


@functools.cache
def tiny_server_url() -> str:
    """`minicoder serve`'s app over the same tiny model, under uvicorn for the rest of the session."""
    server = serve_in_thread(create_app(AsyncEngine(Engine(tiny_model_dir())), ServerSettings(model_name="tiny")))
    url = server.__enter__()
    atexit.register(server.__exit__, None, None, None)
    return f"{url}/v1"


class TestChatMinicoderUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatMinicoder]:
        return ChatMinicoder

    @property
    def chat_model_params(self) -> dict:
        # A server address: nothing is contacted at construction, which is all the unit suite does.
        return {"base_url": "http://127.0.0.1:9/v1", "model": "tiny"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"MINICODER_API_KEY": "key-from-env"}, {"base_url": "http://127.0.0.1:9/v1"},
                {"api_key": "key-from-env"})


class TestChatMinicoderIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMinicoder]:
        return ChatMinicoder

    @property
    def chat_model_params(self) -> dict:
        # max_tokens bounds the tests that build the model from these alone (the suite's own default is 100).
        return {"model": tiny_model_dir(), "max_tokens": 24}

    @property
    def supports_model_override(self) -> bool:
        return False  # an in-process instance runs the one model it loaded; override works with base_url

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatMinicoderServerIntegration(TestChatMinicoderIntegration):
    """The same suite through HTTP: ChatMinicoder(base_url=...) against the server. A per-call `model=` is
    sent to the server, but it serves one model, so there is no other name to override with (skipped)."""

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": tiny_server_url(), "max_tokens": 24}
