"""Structured output and tool calls through the official `openai` client against a real uvicorn server:
`response_format` json_object / json_schema on chat and completions (streamed and not), `tools` with
tool_choice required / named / auto, tool results in the history, and the 400s. The model is a tiny random
Llama: its unconstrained output is never JSON, so every parse below depends on the grammar mask.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest

from minicoder.engine import AsyncEngine, Engine, EngineConfig, GuidedDecoding, SamplingParams
from minicoder.server import ServerSettings, create_app

from conftest import save_tiny_llama, serve_in_thread

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")

# Bounded fields keep a random model's output short: enums, booleans, short strings, small arrays.
PACKAGE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "license": {"enum": ["MIT", "Apache-2.0", "BSD"]},
        "typed": {"type": "boolean"},
        "versions": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
    },
    "required": ["name", "license", "typed", "versions"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_code", "description": "Search the repository.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 6}},
                   "required": ["query"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp(MODEL), context=2048)


@pytest.fixture(scope="module")
def server(model_dir):
    engine = AsyncEngine(Engine(model_dir, EngineConfig()))
    app = create_app(engine, ServerSettings(model_name=MODEL))
    with serve_in_thread(app) as url:
        yield SimpleNamespace(url=url, engine=engine.engine,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120))


def package_format(name: str = "package") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": PACKAGE, "strict": True}}


# --- response_format -------------------------------------------------------------------------------------
def test_json_schema_chat_output_parses_and_matches_the_schema(server):
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, response_format=package_format(),
                                              n=3, temperature=1.0, seed=7, max_tokens=300)
    texts = set()
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PACKAGE)
        texts.add(choice.message.content)
    assert len(texts) > 1  # sampling still samples: the mask only removes what the schema forbids


def test_json_schema_streamed_and_greedy(server):
    stream = server.client.chat.completions.create(model=MODEL, messages=ASK, response_format=package_format(),
                                                   temperature=0, max_tokens=300, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PACKAGE)
    again = server.client.chat.completions.create(model=MODEL, messages=ASK, response_format=package_format(),
                                                  temperature=0, max_tokens=300)
    assert again.choices[0].message.content == text  # greedy under a grammar is deterministic


def test_json_object_on_completions_streamed_and_not(server):
    kwargs = dict(model=MODEL, prompt="def config():", max_tokens=400, temperature=1.0,
                  extra_body={"response_format": {"type": "json_object"}})
    for seed in (1, 2):
        r = server.client.completions.create(seed=seed, **kwargs)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].text), dict)
    chunks = list(server.client.completions.create(seed=3, stream=True, **kwargs))
    assert isinstance(json.loads("".join(c.choices[0].text for c in chunks if c.choices)), dict)


def test_text_format_is_unconstrained(server):
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "text"},
                                              temperature=0, max_tokens=20)
    plain = server.client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_a_short_budget_ends_with_length_and_cut_json(server):
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, response_format=package_format(),
                                              temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith('{"')


def test_engine_preemption_keeps_each_requests_grammar(model_dir):
    # 10 blocks of 16 tokens cannot hold six growing sequences: requests are preempted and recomputed.
    engine = Engine(model_dir, EngineConfig(num_blocks=10, max_num_batched_tokens=64))
    guided = GuidedDecoding.from_schema(PACKAGE)
    params = [SamplingParams(max_new_tokens=120, temperature=1.0, seed=s, guided=guided) for s in range(6)]
    outs = engine.run_to_completion(["def f():"] * 6, params)
    assert engine.stats().preemptions > 0
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PACKAGE)


# --- tools -----------------------------------------------------------------------------------------------
def check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_tool_choice_required_returns_valid_calls(server):
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                              n=4, temperature=1.0, seed=3, max_tokens=300)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        check_calls(choice.message.tool_calls)
    one = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=300)
    assert len(one.choices[0].message.tool_calls) == 1
    check_calls(one.choices[0].message.tool_calls)


def test_named_tool_choice_streamed(server):
    choice = {"type": "function", "function": {"name": "search_code"}}
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                              temperature=1.0, seed=5, max_tokens=300)
    check_calls(r.choices[0].message.tool_calls, {"search_code"})
    assert len(r.choices[0].message.tool_calls) == 1
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                        temperature=1.0, seed=5, max_tokens=300, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert len(deltas) == 1 and deltas[0].function.name == "search_code"
    # Same seed, same call: the streamed arguments equal the non-streamed ones.
    assert deltas[0].function.arguments == r.choices[0].message.tool_calls[0].function.arguments


def test_tool_results_in_the_history_are_rendered(server):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    r = server.client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                              max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")
    from minicoder.server.protocol import ChatMessage
    from minicoder.server.tool_calls import ToolPlan, Tool, render_messages

    plan = ToolPlan.from_request([Tool.model_validate(t) for t in TOOLS], None, None)
    rendered = render_messages([ChatMessage.model_validate(m) for m in history], plan)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in rendered[0]["content"] and "<tools>" in rendered[0]["content"]
    assert rendered[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                                      '"unit": "C"}}\n</tool_call>')
    assert rendered[3]["content"] == "<tool_response>\n18 degrees and sunny\n</tool_response>"
    assert r.usage.prompt_tokens == len(server.engine.prompts.chat(rendered))  # what the model was given


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PACKAGE}}},
     "response_format.json_schema.json_schema.name"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_tools_and_formats_are_400s_naming_the_field(server, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["param"].startswith(param), e.value.body


# --- tool_choice auto, with a scripted model -------------------------------------------------------------
class ScriptedRunner:
    """Test-only backend: the real runner computes every step, then each request's logits are replaced by a
    one-hot on the next token of `script` (end-of-sequence after it), so the 'model' writes exactly that."""

    def __init__(self, engine: Engine):
        self.engine, self.inner, self.script = engine, engine.runner, []

    def forward(self, chunks):
        logits = self.inner.forward(chunks).clone()  # (an inference-mode tensor cannot be written in place)
        for row, chunk in enumerate(c for c in chunks if c.wants_logits):
            written = len(self.engine.requests[chunk.request_id].output_ids)
            logits[row] = -1e4
            logits[row, self.script[written] if written < len(self.script) else self.engine.tokenizer.eos_token_id] = 1e4
        return logits

    def release(self, request_id):
        self.inner.release(request_id)


@pytest.fixture(scope="module")
def scripted(model_dir):
    engine = Engine(model_dir, EngineConfig())
    runner = engine.runner = ScriptedRunner(engine)
    app = create_app(AsyncEngine(engine), ServerSettings(model_name=MODEL))
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)

        def answer(text: str, **kwargs):
            runner.script = engine.tokenizer.encode(text, add_special_tokens=False)
            return client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, **kwargs)

        yield answer


TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "search_code", "arguments": {"query": "wx"}}\n</tool_call>')


def test_auto_tool_calls_are_parsed_from_the_text(scripted):
    r = scripted(TWO_CALLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"}), ("search_code", {"query": "wx"})]
    one = scripted(TWO_CALLS, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in one] == ["get_weather"]
    plain = scripted("It is sunny in <b>Paris</b>.")
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == "It is sunny in <b>Paris</b>."
    broken = scripted('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')  # not a tool: text
    assert broken.choices[0].message.tool_calls is None and "rm_rf" in broken.choices[0].message.content


def test_auto_tool_calls_streamed(scripted):
    chunks = list(scripted(TWO_CALLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == "Let me check." and "<tool" not in content  # the call text is never sent as content
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "search_code")]
    assert json.loads(deltas[1].function.arguments) == {"query": "wx"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    plain = list(scripted("a < b <tool", stream=True))  # a held-back tail that never became a call is sent
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == "a < b <tool"
