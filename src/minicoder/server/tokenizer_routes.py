"""vLLM's tokenizer routes, which evaluation harnesses (lm-evaluation-harness's remote tokenizer) and
prompt-budgeting clients call at the server root:

  POST /tokenize          {prompt, add_special_tokens=true, return_token_strs} or {messages, add_generation_prompt}
                          -> {count, max_model_len, tokens, token_strs}
  POST /detokenize        {tokens} -> {prompt}
  GET  /tokenizer_info    the tokenizer's special tokens, chat template and class, as vLLM reports them

Text is read as `tokenizer.encode` reads it: special-token spellings (`<|EOT|>`) become their ids, which
is how lm-eval finds the end-of-sequence id.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from .errors import APIError
from .protocol import ChatMessage, StrictModel, Text, TokenIds


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: Text | None = Field(None, description="Text to tokenize (or send messages).")
    messages: list[ChatMessage] | None = Field(None, description="A conversation, laid out with the chat template.")
    add_special_tokens: bool | None = Field(None, description="Add BOS (default: true for prompt, false for "
                                            "messages: the template writes its own).")
    add_generation_prompt: bool = Field(True, description="With messages: end ready for the assistant's reply.")
    return_token_strs: bool = Field(False, description="Also return each token as text.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


def router(server) -> APIRouter:
    api = APIRouter(tags=["tokenizer"], dependencies=[Depends(server.api_key_checker())])
    tokenizer = server.tokenizer

    @api.post("/tokenize", response_model=TokenizeResponse, summary="Text or messages to token ids (vLLM's API)")
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send either prompt or messages", param="prompt")
        return await asyncio.to_thread(tokenize_body, body)  # big texts must not block the event loop

    def tokenize_body(body: TokenizeRequest) -> TokenizeResponse:
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            try:
                text = tokenizer.apply_chat_template(messages, chat_template=server.prompts.chat_template,
                                                     tokenize=False, add_generation_prompt=body.add_generation_prompt)
            except Exception as e:  # jinja2's TemplateError and others
                raise APIError(f"the model's chat template rejected the messages: {e}", param="messages") from None
            ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=server.context, tokens=ids, token_strs=strs)

    @api.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids to text (vLLM's API)")
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        vocab_size = server.engine.vocab_size
        bad = next((i for i, t in enumerate(body.tokens) if t >= vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {body.tokens[bad]} is not below the vocabulary size {vocab_size}",
                           param=f"tokens.{bad}")
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))

    @api.get("/tokenizer_info", summary="The tokenizer's configuration (vLLM's API)")
    async def tokenizer_info() -> dict:
        special = {name: getattr(tokenizer, name, None) for name in
                   ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": type(tokenizer).__name__, **{k: str(v) if v is not None else None
                                                                 for k, v in special.items()},
                "chat_template": server.prompts.chat_template or None, "model_max_length": server.context,
                "vocab_size": server.engine.vocab_size,
                "additional_special_tokens": list(getattr(tokenizer, "additional_special_tokens", []) or [])}

    return api
