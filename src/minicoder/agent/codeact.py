"""`CodeActAgent`: a LangGraph loop in which the model acts by writing Python that runs in minicoder's sandbox.

    agent = CodeActAgent(ChatMinicoder(model="runs/demo/sft/final"), tools=[derivative])
    result = agent.run("Calculate the derivative of f(x)=xlnx at x=π using derivative()")
    print(result.answer); print(result.transcript())

The graph has two nodes, as langgraph-codeact's: `call_model` (the chat model replies; code is looked for in
the reply) and `sandbox` (the code runs, its output goes back as the next user message). The loop ends
when a reply has no code, or after `max_turns` replies.

Why a StateGraph of our own and not langgraph-codeact's `create_codeact(model, tools, eval_fn)`: its
`eval_fn(code, locals) -> (output, new_locals)` contract keeps the session's variables and the tool
functions as live Python objects in the graph state and hands them to every call. Our code runs in
another process under another uid, where those objects cannot go (modules, open files, functions do not
cross a pipe); the variables live in that process instead, a `PersistentSession` per conversation, and the
tools are defined there once, by source or import (tools.py). It also takes only the first fenced block
and has no turn limit; small models need the tolerant extraction of code.py and a bound.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from ..errors import MinicoderError
from ..sandbox import Limits, PersistentSession
from .code import extract_code
from .prompt import STOP_SEQUENCES, observation, system_prompt
from .steps import AgentResult, Step
from .tools import Tool, as_tools


class AgentState(TypedDict):
    messages: Annotated[list[BaseMessage], add_messages]
    code: str | None  # what the last reply asked to run
    turns: int  # model replies so far
    steps: Annotated[list[Step], operator.add]


class CodeActAgent:
    def __init__(self, chat_model: BaseChatModel, tools: Sequence[Callable | str | Tool] = (), *,
                 max_turns: int = 8, limits: Limits | None = None, instructions: str | None = None,
                 max_observation_chars: int = 2000):
        """`chat_model`: any LangChain chat model. `tools`: functions, "module:function" or
        "path/to/file.py:function" (see tools.py). `limits`: per execution (default: 10 s, 1 GB, no network).
        `instructions`: put before the CodeAct prompt."""
        if max_turns < 1:
            raise MinicoderError(f"max_turns must be at least 1, got {max_turns}")
        self.chat_model = chat_model
        self.tools = as_tools(tools)
        self.max_turns = max_turns
        self.limits = limits or Limits()
        self.max_observation_chars = max_observation_chars
        self.system_prompt = system_prompt(self.tools, self.limits, instructions)
        self.graph = self._build().compile()

    # --- the graph ---------------------------------------------------------------------------------
    def _build(self) -> StateGraph:
        graph = StateGraph(AgentState)
        graph.add_node("call_model", self._call_model)
        graph.add_node("sandbox", self._run_code)
        graph.add_edge(START, "call_model")
        graph.add_conditional_edges("call_model", lambda s: END if s["code"] is None else "sandbox",
                                    {"sandbox": "sandbox", END: END})
        graph.add_conditional_edges("sandbox", lambda s: END if s["turns"] >= self.max_turns else "call_model",
                                    {"call_model": "call_model", END: END})
        return graph

    def _call_model(self, state: AgentState) -> dict[str, Any]:
        messages = [SystemMessage(self.system_prompt), *state["messages"]]
        turn = state["turns"] + 1
        try:
            reply = self.chat_model.invoke(messages, stop=STOP_SEQUENCES)
        except ValueError as e:  # the in-process engine refusing the prompt: too long for the context
            raise MinicoderError(f"turn {turn}: the model cannot take the conversation: {e}") from None
        text = reply.text
        code = extract_code(text)
        return {"messages": [reply], "code": code, "turns": turn, "steps": [Step("model", turn, text, code)]}

    def _run_code(self, state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        session: PersistentSession = config["configurable"]["session"]
        result = session.run(state["code"])
        text = observation(result, self.limits, self.max_observation_chars)
        return {"messages": [HumanMessage(text)], "code": None,
                "steps": [Step("observation", state["turns"], text, result=result)]}

    # --- running it --------------------------------------------------------------------------------
    def new_session(self) -> PersistentSession:
        """A sandbox session with the tools defined (one per conversation)."""
        files: dict[str, str] = {}
        python_path: list[str] = []
        for tool in self.tools:
            files.update(tool.files)
            python_path += [p for p in tool.python_path if p not in python_path]
        return PersistentSession(limits=self.limits, setup="\n".join(t.setup for t in self.tools), files=files,
                                 python_path=python_path)

    def stream(self, question: str, *, session: PersistentSession | None = None) -> Iterator[Step]:
        """Each step as it happens: a model reply (with the code found in it), then that code's observation."""
        yield from self._steps(question, session, [])

    def run(self, question: str, *, session: PersistentSession | None = None) -> AgentResult:
        """Run to the final answer (or max_turns); the result holds the answer and the whole transcript.
        `session`: continue in an existing sandbox session (its variables), else a fresh one."""
        messages: list[BaseMessage] = []
        steps = list(self._steps(question, session, messages))
        final = steps[-1] if steps and steps[-1].is_final_answer else None
        return AgentResult(question=question, answer=final.text.strip() if final else None,
                           stop_reason="answer" if final else "max_turns", steps=steps,
                           messages=[SystemMessage(self.system_prompt), *messages])

    def _steps(self, question: str, session: PersistentSession | None, messages: list[BaseMessage]) -> Iterator[Step]:
        own = session is None
        session = session or self.new_session()
        config: RunnableConfig = {"configurable": {"session": session},
                                  "recursion_limit": 2 * self.max_turns + 2}
        state = {"messages": [HumanMessage(question)], "code": None, "turns": 0, "steps": []}
        messages.append(HumanMessage(question))
        try:
            for update in self.graph.stream(state, config, stream_mode="updates"):
                for node_update in update.values():
                    messages.extend(node_update.get("messages", []))
                    yield from node_update.get("steps", [])
        finally:
            if own:
                session.close()
