"""What an agent run produces: its steps as they happen, the final result, and a readable transcript."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from langchain_core.messages import BaseMessage

from ..sandbox import SandboxResult

RULE_WIDTH = 64


@dataclass
class Step:
    kind: Literal["model", "observation"]
    turn: int  # 1 for the first model reply and the run of its code, 2 for the next...
    text: str  # the model's whole reply, or the observation sent back to it
    code: str | None = None  # model steps: the code found in the reply (None: the reply is the final answer)
    result: SandboxResult | None = None  # observation steps: how the sandbox run went

    @property
    def is_final_answer(self) -> bool:
        return self.kind == "model" and self.code is None


@dataclass
class AgentResult:
    question: str
    answer: str | None  # the model's reply without code; None when max_turns ran out first
    stop_reason: Literal["answer", "max_turns"]
    steps: list[Step] = field(default_factory=list)
    messages: list[BaseMessage] = field(default_factory=list)  # the whole conversation, system prompt first

    @property
    def turns(self) -> int:
        return max((step.turn for step in self.steps), default=0)

    def transcript(self) -> str:
        return "\n".join([format_question(self.question), *(format_step(s) for s in self.steps)])


def format_question(question: str) -> str:
    return f"🤔: {question}"


def format_step(step: Step) -> str:
    """The seed project's console layout: the model's reply, then the observation between rules."""
    if step.kind == "model":
        return f"🤖:\n{step.text.strip()}\n"
    return f"{' sandbox ':*^{RULE_WIDTH}}\n{step.text}\n{'':*^{RULE_WIDTH}}\n"
