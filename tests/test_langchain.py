"""minicoder.langchain against a tiny model, in-process and through a real uvicorn server: invoke, stream with
callbacks, batch (one engine batch), stop, seed, usage metadata, LCEL chains, async, bad arguments. The texts are
checked against the engine's own greedy output for the same prompt."""

from __future__ import annotations

import asyncio
import dataclasses

import openai
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from minicoder.engine import AsyncEngine, Engine, SamplingParams
from minicoder.langchain import ChatMinicoder, MinicoderLLM
from minicoder.langchain.backends import local_backend
from minicoder.server import ServerSettings, create_app

from conftest import save_tiny_llama, serve_in_thread

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0, max_tokens=12, repetition_penalty=1.3)  # the reference engine applies 1.3 too
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a string."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("lc-tiny"), context=512)


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second engine on the same weights: what the model writes for a prompt, greedy."""
    engine = Engine(model_dir)

    def generate(prompt: str | list[dict], max_new_tokens: int = 12, stop=()) -> tuple[str, int, int]:
        ids = engine.prompts.completion(prompt) if isinstance(prompt, str) else engine.prompts.chat(prompt)
        params = SamplingParams(max_new_tokens=max_new_tokens, stop=list(stop), repetition_penalty=1.3)
        out = engine.run_to_completion([ids], params)[0]
        return out.text, out.prompt_tokens, out.completion_tokens

    return generate


@pytest.fixture(scope="module")
def server_url(model_dir):
    with serve_in_thread(create_app(AsyncEngine(Engine(model_dir)), ServerSettings(model_name="tiny"))) as url:
        yield f"{url}/v1"


@pytest.fixture(params=["in-process", "server"])
def source(request, model_dir):
    """Constructor arguments for each way of reaching the model."""
    if request.param == "in-process":
        return {"model": str(model_dir)}
    return {"base_url": request.getfixturevalue("server_url")}


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_invoke_is_the_models_greedy_text(source, reference):
    text, prompt_tokens, completion_tokens = reference(PROMPT)
    llm = MinicoderLLM(**source, mode="completion", **GREEDY)
    assert llm.invoke(PROMPT) == text and text
    chat = ChatMinicoder(**source, **GREEDY)
    reply = chat.invoke([SystemMessage(MESSAGES[0]["content"]), HumanMessage(MESSAGES[1]["content"])])
    chat_text, chat_prompt, chat_completion = reference(MESSAGES)
    assert reply.content == chat_text
    assert reply.usage_metadata == {"input_tokens": chat_prompt, "output_tokens": chat_completion,
                                    "total_tokens": chat_prompt + chat_completion}
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.response_metadata["model_name"] in ("tiny", source.get("model", "").rsplit("/", 1)[-1])


def test_stream_fires_a_callback_per_token(source, reference):
    recorder = TokenRecorder()
    llm = MinicoderLLM(**source, mode="completion", **GREEDY)
    chunks = list(llm.stream(PROMPT, config={"callbacks": [recorder]}))
    assert "".join(chunks) == reference(PROMPT)[0]
    assert len(chunks) > 3 and [t for t in recorder.tokens if t] == [c for c in chunks if c]

    recorder = TokenRecorder()
    chat = ChatMinicoder(**source, **GREEDY)
    pieces = list(chat.stream(MESSAGES[1]["content"], config={"callbacks": [recorder]}))
    full = pieces[0]
    for piece in pieces[1:]:
        full += piece
    assert full.content == reference([MESSAGES[1]])[0]
    assert pieces[-1].chunk_position == "last" and full.usage_metadata["output_tokens"] == 12
    assert "".join(recorder.tokens) == full.content and len(recorder.tokens) > 3


def test_stop_sequences_cut_the_text(source, reference):
    text = reference(PROMPT, max_new_tokens=12)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    assert MinicoderLLM(**source, mode="completion", **GREEDY).invoke(PROMPT, stop=[stop]) == expected
    assert MinicoderLLM(**source, mode="completion", stop=[stop], **GREEDY).invoke(PROMPT) == expected


def test_lcel_chain(source, reference):
    chain = PromptTemplate.from_template("def {name}(n):") | MinicoderLLM(**source, mode="completion", **GREEDY) \
        | StrOutputParser()
    assert chain.invoke({"name": "fibonacci"}) == reference(PROMPT)[0]
    chat_chain = ChatPromptTemplate.from_messages([("system", "You write Python."), ("user", "{task}")]) \
        | ChatMinicoder(**source, **GREEDY) | StrOutputParser()
    assert chat_chain.invoke({"task": "Reverse a string."}) == reference(MESSAGES)[0]


def test_seed_makes_sampling_reproducible(source):
    llm = MinicoderLLM(**source, mode="completion", temperature=1.0, top_k=0, top_p=1.0, max_tokens=16)
    first, again, other = (llm.invoke(PROMPT, seed=s) for s in (7, 7, 8))
    assert first == again and first != other


def test_async_invoke_and_stream(source, reference):
    chat = ChatMinicoder(**source, **GREEDY)
    expected = reference([MESSAGES[1]])[0]

    async def main():
        reply = await chat.ainvoke(MESSAGES[1]["content"])
        pieces = [piece.content async for piece in chat.astream(MESSAGES[1]["content"])]
        text = await MinicoderLLM(**source, mode="completion", **GREEDY).ainvoke(PROMPT)
        return reply.content, pieces, text

    reply, pieces, text = asyncio.run(main())
    assert reply == expected and "".join(pieces) == expected and len(pieces) > 3
    assert text == reference(PROMPT)[0]


def test_batch_runs_as_one_engine_batch(model_dir, reference, monkeypatch):
    engine = local_backend(model_dir).engine
    running: list[int] = []
    step = engine.step

    def counting_step():
        outputs = step()
        running.append(len(engine.scheduler.running))
        return outputs

    monkeypatch.setattr(engine, "step", counting_step)
    prompts = ["def add(a, b):", "class Stack:", "import os", PROMPT]
    texts = MinicoderLLM(model=str(model_dir), mode="completion", **GREEDY).batch(prompts)
    assert texts == [reference(p)[0] for p in prompts]
    assert max(running) == len(prompts)  # all four decoded in the same steps, not one after another

    running.clear()
    # Chat batches are invokes on concurrent threads, batched as they arrive; long replies make them overlap.
    replies = ChatMinicoder(model=str(model_dir), **{**GREEDY, "max_tokens": 48}).batch([[HumanMessage(p)]
                                                                                       for p in prompts])
    assert [r.content for r in replies] == [reference([{"role": "user", "content": p}], 48)[0] for p in prompts]
    assert max(running) > 1


def test_server_batch_and_chat_mode(server_url, reference):
    prompts = ["def add(a, b):", "class Stack:"]
    assert MinicoderLLM(base_url=server_url, mode="completion", **GREEDY).batch(prompts) == \
        [reference(p)[0] for p in prompts]
    # mode="chat": the text goes in as one user turn of the chat template (the seed tutorial's class)
    assert MinicoderLLM(base_url=server_url, mode="chat", **GREEDY).invoke("Reverse a string.") == \
        reference([MESSAGES[1]])[0]


def test_one_engine_per_model_directory(model_dir):
    a, b = MinicoderLLM(model=str(model_dir)), ChatMinicoder(model=str(model_dir / "."))
    assert a.warm_up() is b.warm_up()


def test_defaults_and_identifying_params(model_dir):
    llm = MinicoderLLM(model=str(model_dir))
    assert (llm.max_new_tokens, llm.top_k, llm.top_p, llm.temperature, llm.repetition_penalty) == (512, 5, 0.8, 0.3, 1.1)
    assert llm._llm_type == "minicoder" and ChatMinicoder(model=str(model_dir))._llm_type == "minicoder-chat"
    assert llm._identifying_params["model"] == str(model_dir) and llm._identifying_params["top_k"] == 5
    assert MinicoderLLM(model=str(model_dir), max_new_tokens=7).max_new_tokens == 7  # both names work


def test_bad_arguments_are_refused(model_dir, server_url):
    llm = MinicoderLLM(model=str(model_dir), **GREEDY)
    with pytest.raises(TypeError, match="frequency_penality"):
        llm.invoke(PROMPT, frequency_penality=1.0)
    with pytest.raises(ValueError, match="top_p"):
        llm.invoke(PROMPT, top_p=0)
    with pytest.raises(ValueError, match="not a model directory"):
        MinicoderLLM(model=str(model_dir / "missing"))
    with pytest.raises(ValueError, match="model=.*or base_url"):
        ChatMinicoder()
    with pytest.raises(ValueError, match="tool calling"):
        ChatMinicoder(model=str(model_dir)).invoke([ToolMessage("4", tool_call_id="1")])
    with pytest.raises(ValueError, match="prompt has .* tokens"):
        llm.invoke("x = 1\n" * 400)
    with pytest.raises(openai.NotFoundError):  # the server names the model it serves
        MinicoderLLM(base_url=server_url, model="other", **GREEDY).invoke(PROMPT)


def test_timeout_cancels_the_request(model_dir):
    llm = MinicoderLLM(model=str(model_dir), mode="completion", temperature=0, max_tokens=400, timeout=0.05)
    with pytest.raises(TimeoutError):
        llm.invoke(PROMPT)
    engine = local_backend(model_dir).engine
    for _ in range(200):  # the stepping thread retires the cancelled request
        if not engine.has_unfinished():
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not engine.has_unfinished()


def test_a_request_the_engine_fails_raises(model_dir, monkeypatch):
    engine = local_backend(model_dir).engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: [dataclasses.replace(out, finished=True, finish_reason="error")
                                                 for out in step()])
    with pytest.raises(RuntimeError, match="engine failed request"):
        MinicoderLLM(model=str(model_dir), mode="completion", **GREEDY).invoke(PROMPT)
    with pytest.raises(RuntimeError, match="engine failed request"):
        list(ChatMinicoder(model=str(model_dir), **GREEDY).stream("hi"))
