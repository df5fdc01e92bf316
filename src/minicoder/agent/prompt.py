"""What the model reads: the CodeAct system prompt, and each execution's result in one fixed format.

After the CodeAct paper (Wang et al., 2024, "Executable Code Actions Elicit Better LLM Agents"): actions are
Python run in an interactive session that keeps its state; each result comes back as an observation; the
model answers in plain text when it is done. The fence is Markdown's ```python (what chat models write
unprompted); `code.py` also reads the paper's <execute> tags.

Observations always start with `Observation` and say how the run ended when it did not end normally:

    Observation:
    The derivative of f(x)=xlnx at x=π is: 2.144729885888985

    Observation (error: the code raised an exception; variables defined before it are kept):
    Traceback (most recent call last): ...
"""

from __future__ import annotations

from ..sandbox import Limits, SandboxResult
from .tools import Tool

OBSERVATION = "Observation"
# Small models go on to write the observation themselves; generation stops there instead.
STOP_SEQUENCES = [f"\n{OBSERVATION}:", f"\n{OBSERVATION} ("]

SYSTEM_PROMPT = """You are a helpful assistant that solves tasks by writing and running Python code.

To run code, put it in one fenced block:
```python
print(1 + 1)
```
The code runs in a persistent Python session: variables, functions and imports from your earlier code are kept. \
The next message shows what it printed (and any error), starting with "{observation}". Print every value you \
need to see. Write one code block per reply, then wait for its observation. The session has the Python standard \
library and no internet access; each run may take at most {timeout:g} seconds.

When you have the answer, reply in plain text with no code block: that reply is your final answer to the user.
"""

TOOLS_SECTION = """
These functions are already defined in the session. Call them directly; do not import or redefine them:

{stubs}
"""


def system_prompt(tools: list[Tool], limits: Limits, instructions: str | None = None) -> str:
    prompt = f"{instructions.strip()}\n\n" if instructions else ""
    prompt += SYSTEM_PROMPT.format(observation=f"{OBSERVATION}:", timeout=limits.timeout_s)
    if tools:
        prompt += TOOLS_SECTION.format(stubs="\n\n".join(tool.describe() for tool in tools))
    return prompt


def _how_it_ended(result: SandboxResult, limits: Limits) -> str | None:
    kept = "variables defined before it are kept"
    lost = "the session was restarted: variables from earlier code are gone (the tools are defined again)"
    reasons = {
        "error": f"error: the code raised an exception; {kept}",
        "timeout": f"stopped: it ran past the {limits.timeout_s:g} s time limit; {lost}",
        "cpu": f"stopped: it used more than {limits.cpu_s} s of CPU time; {kept}",
        "memory": f"stopped: it ran out of memory (limit {limits.memory_mb} MB)",
        "output_limit": f"stopped: it printed more than {limits.max_output_bytes:,} bytes; {lost}",
        "killed": "stopped: the process was killed",
    }
    if result.status == "ok":
        return None
    reason = reasons.get(result.status, f"stopped: {result.status}")
    if result.state_lost and lost not in reason:
        reason += f"; {lost}"
    return reason


def observation(result: SandboxResult, limits: Limits, max_chars: int = 2000) -> str:
    """One execution's result as the model sees it; long output keeps its start and its end."""
    output = result.stdout
    stderr = result.stderr.replace("\n[sandbox] the session worker was stopped; its state is lost\n", "")
    if stderr.strip():
        output += ("" if not output or output.endswith("\n") else "\n") + stderr
    output = output.strip("\n")
    code = result.returncode
    if code not in (None, 0, 1) and result.status not in ("timeout", "output_limit"):  # not our own kill
        output = "\n".join(filter(None, [output, f"(exit status {code})" if code > 0 else f"(killed by signal {-code})"]))
    if len(output) > max_chars:
        cut = len(output) - max_chars
        output = f"{output[: max_chars // 2]}\n... [{cut:,} characters cut] ...\n{output[-max_chars // 2:]}"
    if not output:
        output = "(no output: print the values you need to see)" if result.status == "ok" else "(no output)"
    reason = _how_it_ended(result, limits)
    header = f"{OBSERVATION}:" if reason is None else f"{OBSERVATION} ({reason}):"
    return f"{header}\n{output}"
