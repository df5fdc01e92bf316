"""Request and response bodies of the HTTP API: the OpenAI-compatible routes and the prompt + history chat route.

Pydantic checks types and ranges, so a bad field gets a 400 that names it, and FastAPI builds the
OpenAPI schema (`/docs`) from these models. Fields follow OpenAI's API; the extra sampling fields
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`) are vLLM's, so
clients written for vLLM (`extra_body={...}`) work unchanged. Unknown fields are ignored, as OpenAI does.
A field sent as `null` takes its default. Types are strict: "0.5" is not a number, "yes" not a boolean,
`Infinity` and `NaN` are not numbers, and text must be valid Unicode (a lone surrogate such as "\ud800"
cannot be encoded, so it is refused here instead of failing in the tokenizer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_serializer

from .structured import ResponseFormat
from .tool_calls import Tool, ToolCall, ToolCallDelta, ToolChoice

# --- requests ------------------------------------------------------------------------------------------


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = Field(False, description="Send a last chunk with the token counts of the whole request.")


class SamplingFields(StrictModel):
    """What /v1/completions and /v1/chat/completions share."""

    model: str | None = Field(None, description="The served model's name (see /v1/models); absent = that model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; prompt + max_tokens must fit "
                                   "the context.")
    temperature: float | None = Field(None, ge=0, description="0 = greedy. Default 1.0.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling. Default 1.0 (off).")
    n: int | None = Field(None, ge=1, le=128, description="Choices per prompt. Default 1.")
    stream: bool | None = Field(None, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, description="Text ends before the first of these strings.")
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64, description="Same seed, same text (choice i uses "
                             "seed + i).")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be absent or empty.")
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 = off (default).")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens less likely than min_p x the top one.")
    repetition_penalty: float | None = Field(None, gt=0, description="CTRL-style penalty; 1.0 = off (default).")
    min_tokens: int | None = Field(None, ge=0, description="Generate at least this many tokens before stopping.")
    ignore_eos: bool | None = Field(None, description="Go on past end-of-sequence tokens.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Token ids that end the text.")
    response_format: ResponseFormat | None = Field(None, description='{"type": "json_object"} or {"type": '
                                                   '"json_schema", "json_schema": {"name", "schema"}}: the output '
                                                   'is constrained to match (server/structured.py).')


TokenIds = list[Annotated[int, Field(ge=0)]]


class ExtraFile(BaseModel):
    """A file (or a chunk of one) of the repository, as llama.cpp's server takes it in `input_extra`.
    Other keys clients add (llama.vim's `time`) are ignored, as llama-server ignores them."""

    filename: Text = Field("", description="Its path in the repository, written in its header in the prompt.")
    text: Text = Field(description="Its text.")

    model_config = ConfigDict(strict=True)


def _prompt_kind(value) -> str | None:
    """Which form a prompt takes, from its first element: pydantic then validates only that form (trying
    every member of the union made a million-token prompt cost seconds, spent on error lists)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        first = value[0] if value else ""
        if isinstance(first, list):
            return "list[list[int]]"
        return "list[int]" if isinstance(first, int) and not isinstance(first, bool) else "list[str]"
    return None


Prompt = Annotated[Annotated[Text, Tag("str")] | Annotated[list[Text], Tag("list[str]")]
                   | Annotated[TokenIds, Tag("list[int]")] | Annotated[list[TokenIds], Tag("list[list[int]]")],
                   Discriminator(_prompt_kind, custom_error_type="prompt_type",
                                 custom_error_message="prompt must be a string, a list of strings, a list of token "
                                 "ids or a list of token-id lists")]


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: continue a prompt, or fill in the middle between `prompt` and `suffix`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "minicoder", "prompt": "def hello_world():", "max_tokens": 32, "temperature": 0},
        {"model": "minicoder", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 16},
    ]})

    prompt: Prompt = Field(description="Text, a list of texts, token ids, or a list of token-id lists.")
    suffix: Text | None = Field(None, description="Text after the hole: fill-in-the-middle with the model's FIM tokens.")
    input_extra: list[ExtraFile] | None = Field(None, description="With suffix: other files of the repository, "
                                                "put before the code in the prompt (most relevant last).")
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate; prompt + max_tokens must fit "
                                   "the context; 0 (with echo) returns the prompt and its logprobs only.")
    echo: bool | None = Field(None, description="Put the prompt before each choice's text; with logprobs, the "
                              "prompt tokens' logprobs come first (the first token's is null).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of the chosen tokens and the "
                                 "`logprobs` most likely ones.")
    best_of: int | None = Field(None, ge=1, description="Only best_of = n is supported.")


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls.")
    tool_call_id: Text | None = Field(None, description="A tool turn: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`: the reply to a conversation, laid out with the model's chat template."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "minicoder", "max_tokens": 128,
         "messages": [{"role": "system", "content": "You are a helpful coding assistant."},
                      {"role": "user", "content": "Write a function that reverses a string."}]},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens (wins over it).")
    logprobs: bool | None = Field(None, description="Log-probabilities of the chosen tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely tokens too.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (server/tool_calls.py).")
    tool_choice: ToolChoice | None = Field(None, description='"none", "auto" (default with tools), "required", or '
                                           '{"type": "function", "function": {"name"}}.')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call. Default true.")


class HistoryChatRequest(StrictModel):
    """`POST /`: the request of the DeepSeek-Coder FastAPI tutorial's server (`prompt` + `history`), unchanged."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "你好", "history": []}]})

    prompt: Text
    history: list[Annotated[list[Text], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="Earlier turns as [user, assistant] pairs.")
    max_length: int | None = Field(None, ge=1, description="Most new tokens (default 1024, clipped to the context).")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 0.7.")
    top_k: int | None = Field(None, ge=0, description="Default 5; 0 = off.")
    temperature: float | None = Field(None, ge=0, description="Default 0.95; 0 = greedy.")
    repetition_penalty: float | None = Field(None, gt=0, description="Default 1.1.")


# --- responses -----------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose keys and values came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the prompt's first token (with echo), which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """Also each chunk of a stream (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler):  # OpenAI sends {"content": "..."}, not {"role": null, ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicoder"
    max_model_len: int = Field(description="Prompt + completion tokens one request can hold.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HistoryChatResponse(BaseModel):
    response: str
    history: list[tuple[str, str]]
    status: int = 200
    time: str = Field(description="Local time, YYYY-MM-DD HH:MM:SS.")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
