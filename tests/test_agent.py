"""The CodeAct agent: the seed example through a scripted chat model, state across turns, cells that crash / loop /
flood / exit, max turns, tools by source / module / file, code extraction, and `minicoder agent` against a server."""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from minicoder.agent import CodeActAgent, Tool, extract_code
from minicoder.errors import MinicoderError
from minicoder.sandbox import Limits

from conftest import run_cli, save_tiny_llama, serve_in_thread

QUESTION = ("Calculate the derivative of the function f(x)=xlnx at x=π. Please directly use the existing utility "
            "function 'derivative()' for computation; you do not need to import any packages or redefine it—just "
            "use it directly.")
SEED_CODE = '''```python
from math import pi, log

def f(x):
    return x * log(x)

# Using the provided derivative function to calculate the derivative of f at x=pi
derivative_value = derivative(f, x=pi)

print(f"The derivative of f(x)=xlnx at x=π is: {derivative_value}")
```'''


def derivative(f, x, h=1e-5):
    """
    Compute the numerical derivative of function f at point x using central difference.

    Parameters:
    - f: callable, the function to differentiate
    - x: float, the point at which to evaluate the derivative
    - h: float, optional, the step size for the finite difference (default: 1e-5)

    Returns:
    - float, the approximate derivative f'(x)
    """
    return (f(x + h) - f(x - h)) / (2 * h)


class ScriptedChatModel(BaseChatModel):
    """Deterministic replies: a string, or a function of the messages so far (to quote an observation)."""

    replies: list
    calls: list = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop=None, run_manager=None, **kwargs) -> ChatResult:
        reply = self.replies[min(len(self.calls), len(self.replies) - 1)]
        self.calls.append(list(messages))
        text = reply(messages) if callable(reply) else reply
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])


def quote_last_observation(messages: list[BaseMessage]) -> str:
    value = re.search(r"[-\d.]+$", messages[-1].text.strip()).group()
    return f"The derivative of f(x) = x ln x at x = π is approximately {value}."


def test_seed_example_through_a_scripted_model():
    model = ScriptedChatModel(replies=[SEED_CODE, quote_last_observation])
    result = CodeActAgent(model, tools=[derivative]).run(QUESTION)
    expected = derivative(lambda x: x * math.log(x), math.pi)
    assert [s.kind for s in result.steps] == ["model", "observation", "model"]
    assert result.steps[1].text == f"Observation:\nThe derivative of f(x)=xlnx at x=π is: {expected}"
    assert result.stop_reason == "answer" and str(expected) in result.answer and "2.1447" in result.answer
    system = model.calls[0][0].text  # the tool reached the prompt from its signature and docstring
    assert "def derivative(f, x, h=1e-05):" in system and "central difference" in system
    assert model.calls[1][-1].text == result.steps[1].text  # the observation went back to the model
    assert "Observation:\nThe derivative of f(x)=xlnx at x=π is: 2.1447" in result.transcript()


def run_cells(cells: list[str], limits: Limits) -> list[str]:
    """Each cell as one model reply, then a final answer: the observations the model got back."""
    model = ScriptedChatModel(replies=[f"```python\n{c}\n```" for c in cells] + ["done"])
    result = CodeActAgent(model, tools=[derivative], limits=limits, max_turns=20).run("exercise the sandbox")
    assert result.answer == "done"
    return [s.text for s in result.steps if s.kind == "observation"]


def test_state_persists_and_the_session_survives_bad_cells():
    observations = run_cells([
        "import math\nvalue = 41",
        "print(math.sqrt(value + 8))",  # 7.0: the import and the variable survived
        "1 / 0",
        "while True:\n    pass",  # CPU-bound loop: stopped by the per-call CPU limit, state kept
        "print(value)",
        "block = bytearray(4 * 1024 ** 3)",  # past the memory limit
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=5)",  # no network
        "while True:\n    print('y' * 1000)",  # floods the output: the worker is killed
        "print('value' in globals(), derivative(lambda t: t * t, 3.0))",  # state gone, the tool defined again
        "import os\nos._exit(3)",
        "print('still here')",
    ], Limits(timeout_s=60, cpu_s=1, memory_mb=1024, max_output_bytes=200_000))  # a long wall clock: the CPU limit acts first
    assert observations[1] == "Observation:\n7.0"
    assert observations[2].startswith("Observation (error: the code raised an exception") and \
        "ZeroDivisionError: division by zero" in observations[2]
    assert observations[3].startswith("Observation (stopped: it used more than 1 s of CPU time; variables")
    assert observations[4] == "Observation:\n41"
    assert observations.pop(5).startswith("Observation (stopped: it ran out of memory (limit 1024 MB)):")
    network = observations.pop(5)
    assert network.startswith("Observation (error:") and "URLError" in network
    assert observations[5].startswith("Observation (stopped: it printed more than 200,000 bytes; the session "
                                      "was restarted")
    assert len(observations[5]) < 2400 and "characters cut" in observations[5]
    assert observations[6] == f"Observation:\nFalse {derivative(lambda t: t * t, 3.0)}"
    assert observations[7].endswith("(exit status 3)") and "restarted" in observations[7]
    assert observations[8] == "Observation:\nstill here"


def test_a_cell_past_the_time_limit_is_stopped():
    observations = run_cells(["value = 1", "import time\ntime.sleep(60)", "print('value' in globals())"],
                             Limits(timeout_s=2))
    assert observations[1] == ("Observation (stopped: it ran past the 2 s time limit; the session was restarted: "
                               "variables from earlier code are gone (the tools are defined again)):\n(no output)")
    assert observations[2] == "Observation:\nFalse"


def test_a_conversation_can_continue_in_its_session():
    agent = CodeActAgent(ScriptedChatModel(replies=["```python\ntotal = 40\n```", "set"]))
    with agent.new_session() as session:
        assert agent.run("set it", session=session).answer == "set"
        agent.chat_model = ScriptedChatModel(replies=["```python\nprint(total + 2)\n```", "read"])
        assert agent.run("read it", session=session).steps[1].text == "Observation:\n42"


def test_max_turns_ends_a_model_that_never_answers():
    model = ScriptedChatModel(replies=["```python\nprint('again')\n```"])
    agent = CodeActAgent(model, max_turns=3)
    steps = list(agent.stream("loop forever"))
    assert [s.kind for s in steps] == ["model", "observation"] * 3
    result = agent.run("loop forever")
    assert result.answer is None and result.stop_reason == "max_turns" and result.turns == 3
    with pytest.raises(MinicoderError, match="max_turns"):
        CodeActAgent(model, max_turns=0)


def test_tools_by_source_module_and_file(tmp_path):
    # A module in a directory the sandbox's own uid may read (pytest's tmp_path is private to root).
    shared = Path(tempfile.mkdtemp(prefix="minicoder-agent-tools-"))
    shared.chmod(0o755)
    (shared / "circle_tools.py").write_text("import math\n\ndef area(r):\n    'Area of a circle.'\n"
                                            "    return math.pi * r * r\n")
    (tmp_path / "text_tools.py").write_text("def shout(s: str) -> str:\n    'Upper-case s.'\n    return s.upper()\n")
    sys.path.insert(0, str(shared))
    try:
        tools = [degrees_of, "circle_tools:area", f"{tmp_path / 'text_tools.py'}:shout"]
        model = ScriptedChatModel(replies=["```python\nprint(degrees_of(math.pi), round(area(2), 3), shout('hi'))\n"
                                           "```", "ok"])
        agent = CodeActAgent(model, tools=tools)
        assert "def shout(s: str) -> str:" in agent.system_prompt and "Area of a circle." in agent.system_prompt
        result = agent.run("use the tools")
        assert result.steps[1].text == "Observation:\n180.0 12.566 HI"
    finally:
        sys.path.remove(str(shared))


def degrees_of(radians):
    """Radians to degrees (uses the module-level import of math, which the sandbox imports again)."""
    return math.degrees(radians)


HELPER_SCALE = [2]


def uses_a_helper_global(x):
    return x * HELPER_SCALE[0]


def test_tools_that_cannot_be_sent_are_refused(tmp_path):
    with pytest.raises(MinicoderError, match="global 'HELPER_SCALE'"):
        Tool.from_function(uses_a_helper_global)
    with pytest.raises(MinicoderError, match="def"):
        Tool.from_function(lambda x: x)

    def closure_tool():
        return tmp_path

    with pytest.raises(MinicoderError, match="closure over tmp_path"):
        Tool.from_function(closure_tool)
    with pytest.raises(MinicoderError, match="expected module:function"):
        Tool.from_spec("no_function_here")
    with pytest.raises(MinicoderError, match="cannot import"):
        Tool.from_spec("no_such_module_xyz:f")
    if os.geteuid() == 0:  # the sandbox runs as another uid, which cannot read a root-only directory
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        (private / "secret_tools.py").write_text("def f():\n    return 1\n")
        sys.path.insert(0, str(private))
        try:
            with pytest.raises(MinicoderError, match="not readable by the sandbox"):
                Tool.from_spec("secret_tools:f")
        finally:
            sys.path.remove(str(private))


@pytest.mark.parametrize("reply, code", [
    ("```python\nprint(1)\n```", "print(1)"),
    ("Let me compute it.\n```py\nx = 2\n```\nthen\n```\nprint(x)\n```", "x = 2\n\nprint(x)"),  # several blocks
    ("```python\nprint(1)\nprint(2)", "print(1)\nprint(2)"),  # unclosed fence
    ("Sure! ```python\nprint(3)```", "print(3)"),  # fence after text, closed at the end of the line
    ("I will run:\nimport math\nprint(math.pi)", "import math\nprint(math.pi)"),  # no fence, prose dropped
    ("<execute>\nprint(4)\n</execute>", "print(4)"),  # the CodeAct paper's tags
    ("    y = 1\n    print(y)", "y = 1\nprint(y)"),  # indented bare code
    ("The answer is 2.1447.", None),
    ("2.1447", None),  # parses, but is no statement: an answer
    ("Yes", None),
    ("```text\nprint(5)\n```", None),  # another language is not run
    ("", None),
])
def test_code_extraction(reply, code):
    assert extract_code(reply) == code


# --- through real models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("agent-tiny"), context=2048)


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "seed_tools.py"
    path.write_text("def derivative(f, x, h=1e-5):\n    'Central difference.'\n"
                    "    return (f(x + h) - f(x - h)) / (2 * h)\n")
    return path


def test_cli_against_a_served_model(model_dir, tools_file, one_thread):
    from minicoder.engine import AsyncEngine, Engine
    from minicoder.server import ServerSettings, create_app

    with serve_in_thread(create_app(AsyncEngine(Engine(model_dir)), ServerSettings(model_name="tiny"))) as url:
        proc = run_cli("agent", "--endpoint", f"{url}/v1", QUESTION, "--tools", f"{tools_file}:derivative",
                       "--max-turns", "2", "--max-new-tokens", "24")
    assert proc.returncode in (0, 1), proc.stderr  # whatever the random model writes, the loop runs
    assert proc.stdout.startswith(f"🤔: {QUESTION}\n🤖:")
    assert re.search(r"^agent: (final answer after|no final answer within)", proc.stderr, re.M)


def test_agent_with_the_in_process_chat_model(model_dir):
    from minicoder.langchain import ChatMinicoder

    chat = ChatMinicoder(model=str(model_dir), temperature=0, max_tokens=16)
    result = CodeActAgent(chat, tools=[derivative], max_turns=2).run("What is 2 + 2?")
    assert result.steps and result.steps[0].kind == "model" and result.turns <= 2
    assert result.messages[0].type == "system" and result.messages[1].text == "What is 2 + 2?"


def test_cli_errors(model_dir, tmp_path):
    for args, message in [
        (("agent", str(model_dir), "q", "--endpoint", "http://127.0.0.1:9/v1"), "give a MODEL directory or --endpoint URL, not both"),
        (("agent", str(tmp_path / "missing"), "q"), "model directory does not exist"),
        (("agent", str(model_dir), "q", "--tools", "nope"), "expected module:function"),
        (("agent", str(model_dir), "q", "--max-turns", "0"), "--max-turns must be at least 1"),
        (("agent", "--endpoint", "http://127.0.0.1:9/v1", "q", "--model-name", "x"), "cannot reach --endpoint"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 2 and re.match(f"error: .*{re.escape(message)}", proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr
