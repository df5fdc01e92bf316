"""Tool calling on /v1/chat/completions: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls`.

The tools are described to the model in a system-prompt block, in the Hermes / Qwen layout that code models
are tuned on (the tools' JSON inside `<tools>`, calls written as `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`). Earlier turns are written back the same way: an assistant message's `tool_calls` as
`<tool_call>` blocks, `tool` messages as a user turn of `<tool_response>` blocks, so any chat template that
knows system / user / assistant renders them.

    tool_choice "none"      tools are not offered; plain text
    tool_choice "auto"      the model decides; `<tool_call>` blocks in its text become `message.tool_calls`
                            (text outside them stays `content`); no blocks = a plain answer
    tool_choice "required"  the output is constrained to tool calls (a JSON array of {"name", "arguments"}
                            matching each tool's `parameters`, or one call with parallel_tool_calls false)
    {"type": "function", "function": {"name": N}}   constrained to one call of N

finish_reason is "tool_calls" when the answer is tool calls. With parallel_tool_calls false, at most one
call is returned. Streaming sends the text before a `<tool_call>` as it comes, and each call as one
`delta.tool_calls` entry (id, name, the whole arguments string) when the generation ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import GuidedDecoding

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
ANY_OBJECT = {"type": "object"}

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; required / named calls always match the schema.")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    """What one chat request does with its tools."""

    tools: list[Tool]
    mode: Literal["none", "auto", "required", "named"]
    parallel: bool = True
    name: str | None = None  # the named tool_choice

    @classmethod
    def from_request(cls, tools: list[Tool] | None, tool_choice, parallel_tool_calls: bool | None) -> "ToolPlan | None":
        """None when the request has no tools; ToolError (naming the field) for what cannot be honoured."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            if parallel_tool_calls is not None:
                raise ToolError("parallel_tool_calls needs tools", "parallel_tool_calls")
            return None
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise ToolError("tools have duplicate function names", "tools")
        parallel = parallel_tool_calls is not False
        if isinstance(tool_choice, NamedToolChoice):
            if tool_choice.function.name not in names:
                raise ToolError(f"tool_choice names the function {tool_choice.function.name!r}, which is not in "
                                "tools", "tool_choice")
            return cls(tools, "named", parallel, tool_choice.function.name)
        return cls(tools, tool_choice or "auto", parallel)

    # --- the prompt ----------------------------------------------------------------------------
    def system_block(self) -> str | None:
        if self.mode == "none":
            return None
        tools = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in self.tools)
        block = TOOLS_PROMPT.format(tools=tools)
        if not self.parallel:
            block += "\nCall at most one function."
        return block

    # --- the grammar ---------------------------------------------------------------------------
    def guided(self) -> GuidedDecoding | None:
        """The constraint for required / named calls (None for auto and none)."""
        if self.mode == "named":
            return GuidedDecoding.from_schema(_call_schema(self._tool(self.name)))
        if self.mode != "required":
            return None
        calls = [_call_schema(t) for t in self.tools]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return GuidedDecoding.from_schema({"type": "array", "items": one, "minItems": 1} if self.parallel else one)

    def _tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.function.name == name)

    # --- the answer ----------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished answer; an answer that is not a valid call is all content."""
        if self.mode == "none":
            return text, []
        if self.mode in ("required", "named"):
            calls = self._calls_from_json(text)
            return (text, []) if calls is None else (None, calls)
        blocks = _CALL_BLOCK.findall(text)
        if not blocks:
            return text, []
        calls = []
        for block in blocks:
            found = self._calls_from_json(block)
            if found is None:
                return text, []
            calls += found
        content = text[: text.index(CALL_OPEN)].strip() or None
        return content, calls[:1] if not self.parallel else calls

    def _calls_from_json(self, text: str) -> list[ToolCall] | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in {t.function.name for t in self.tools}:
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                                  function=FunctionCall(name=item["name"],
                                                        arguments=json.dumps(arguments, ensure_ascii=False))))
        return calls or None

    def holds_back(self) -> bool:
        """Streaming: whether nothing can be sent as content before the end (constrained calls)."""
        return self.mode in ("required", "named")


def _call_schema(tool: Tool) -> dict:
    parameters = tool.function.parameters or ANY_OBJECT
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def render_messages(messages: list, plan: ToolPlan | None) -> list[dict]:
    """The request's messages as plain {role, content} turns for the chat template: the tools block added to
    the system prompt, assistant tool calls and tool results written as `<tool_call>` / `<tool_response>`."""
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if role == "assistant" and m.tool_calls:
            calls = [f"{CALL_OPEN}\n{_call_text(c)}\n{CALL_CLOSE}" for c in m.tool_calls]
            text = "\n".join([text, *calls] if text else calls)
        if role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results: one user turn, as Qwen lays them out
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "tool_results": True})
            continue
        out.append({"role": role, "content": text})
    block = plan.system_block() if plan is not None else None
    if block:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _call_text(call: ToolCall) -> str:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)


class ToolCallStream:
    """Streaming: which part of each text delta can go out as content now. Text from a `<tool_call>` on
    (or a tail that may be its beginning) is held until the end, when `finish` parses the whole answer."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.plan.holds_back() or self.in_call:
            return ""
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.in_call = True
            end = start
        else:
            end = len(self.text) - _partial_open(self.text)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content not sent yet, the tool calls) once the generation has ended."""
        content, calls = self.plan.parse(self.text)
        if calls:
            # The content before the first call went out already (it is what parse keeps as content).
            return "", calls
        return self.text[self.sent :], []


def _partial_open(text: str) -> int:
    """Length of the longest tail of `text` that is a beginning of `<tool_call>`."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0

