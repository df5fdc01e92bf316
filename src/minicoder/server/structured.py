"""Structured output: OpenAI's `response_format` (and Ollama's `format`) turned into a grammar the engine enforces.

    {"type": "text"}                                   no constraint
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}, "strict": true}}
                                                       JSON matching the schema (strict or not: always enforced)

The output then always parses (and matches the schema) whatever the model, unless max_tokens runs out
first: then finish_reason is "length" and the text is the cut-off JSON, as OpenAI's API does. A schema the
grammar compiler cannot use is a 400 naming `response_format`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import GuidedDecoding


class TextFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, description="The schema's name (OpenAI requires one).")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                        description="A JSON Schema; absent = any JSON value.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


def guided_from_response_format(response_format) -> GuidedDecoding | None:
    if response_format is None or isinstance(response_format, TextFormat):
        return None
    if isinstance(response_format, JsonObjectFormat):
        return GuidedDecoding(json_object=True)
    return GuidedDecoding.from_schema(response_format.json_schema.json_schema)


def guided_from_ollama_format(fmt: str | dict | None) -> GuidedDecoding | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema; "" or absent = free text."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return GuidedDecoding(json_object=True)
    if isinstance(fmt, dict):
        return GuidedDecoding.from_schema(fmt)
    from .errors import APIError  # (errors.py imports the protocol, which imports this module)

    raise APIError(f'format must be "json" or a JSON schema object, got {fmt!r}', param="format")


async def checked(engine, guided: GuidedDecoding | None, param: str = "response_format") -> GuidedDecoding | None:
    """`guided`, once the engine's grammar compiler has accepted it (compiled off the event loop, remembered
    for the next request); a 400 naming `param` otherwise."""
    if guided is None:
        return None
    from .errors import APIError  # (errors.py imports the protocol, which imports this module)

    try:
        await asyncio.to_thread(engine.grammars.check, guided)
    except ValueError as e:
        raise APIError(f"{param}: {e}", param=param) from None
    return guided
