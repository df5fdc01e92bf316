"""The CodeAct agent: the model answers with Python, minicoder's sandbox runs it, the output goes back.

    from minicoder.agent import CodeActAgent
    result = CodeActAgent(chat_model, tools=[my_function]).run("question")

Parts: codeact.py (the LangGraph loop), code.py (finding code in replies), prompt.py (system prompt and
observations), tools.py (user functions into the sandbox), steps.py (results, transcript), cli.py
(`minicoder agent`). Names load on first use, so `minicoder --help` does not import LangGraph.
"""

__all__ = ["AgentResult", "CodeActAgent", "Step", "Tool", "extract_code"]

_HOMES = {"AgentResult": "steps", "Step": "steps", "CodeActAgent": "codeact", "Tool": "tools", "extract_code": "code"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
