"""A typical FastAPI + transformers deployment (one `api.py`), as a user would write it: the baseline that
`benchmarks/serving_bench.py` compares minicoder's server against.

    .venv/bin/python benchmarks/baseline_server.py MODEL_DIR [--port 6006] [--dtype float32] [--threads 2]

Faithful to the original script: `POST /` takes `{"prompt", "history", "max_length", "top_p", "top_k", "temperature",
"repetition_penalty"}` with the original's defaults (1024 new tokens, top_k 5, top_p 0.7, temperature 0.95,
repetition_penalty 1.1, sampling on), builds chat messages from the history, runs the transformers
`pipeline("text-generation")` (that is, `model.generate`) inside the `async def` handler, and answers
`{"response", "history", "status", "time"}`. The handler blocks the event loop while it generates, so the
server runs one request at a time and concurrent requests queue, as the original's do.

What differs, and why (all for the benchmark; a request without the new fields behaves as the original's):
- CPU instead of CUDA, fp32 by default (fp32 is the fast dtype of a CPU without bf16 in hardware; the
  original loads bf16 on a GPU); `torch_gc` is then a no-op, as it is in the original on a machine without CUDA.
- `history` may be absent (the original crashes on `None`).
- Two optional request fields, `do_sample` (default true, the original's) and `min_new_tokens` (default none),
  so a benchmark can ask for greedy decoding and a fixed output length (`min_new_tokens == max_length`).
- `POST /stream`: the same generation streamed token by token (server-sent events, one `data:` line per
  token, then `data: [DONE]`), which is what a user adds to such a script to show text as it comes (transformers'
  streamer API, generation in a thread). A global lock keeps it one request at a time, like `POST /`.
- A tokenizer without a chat template gets the prompt as plain text (the original's model has a template).
"""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import threading

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

DEVICE = "cpu"

model = tokenizer = generator = None
generate_lock = threading.Lock()  # one generation at a time, for /stream as for / (whose handler blocks the loop)


def torch_gc():
    if torch.cuda.is_available():  # as in the original; nothing to do on CPU
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


app = FastAPI()


def parse(json_post: dict):
    prompt = json_post.get("prompt")
    history = json_post.get("history") or []
    max_length = json_post.get("max_length")
    top_p = json_post.get("top_p")
    top_k = json_post.get("top_k")
    temperature = json_post.get("temperature")
    repetition_penalty = json_post.get("repetition_penalty")

    if tokenizer.chat_template:
        model_input = []
        for q, a in history:
            model_input.append({"role": "user", "content": q})
            model_input.append({"role": "assistant", "content": a})
        model_input.append({"role": "user", "content": prompt})
    else:
        model_input = prompt

    kwargs = dict(
        max_new_tokens=max_length if max_length else 1024,
        top_k=top_k if top_k else 5,
        top_p=top_p if top_p else 0.7,
        temperature=temperature if temperature else 0.95,
        repetition_penalty=repetition_penalty if repetition_penalty else 1.1,
        do_sample=json_post.get("do_sample", True),
    )
    if json_post.get("min_new_tokens"):
        kwargs["min_new_tokens"] = json_post["min_new_tokens"]
    if isinstance(model_input, str):
        kwargs["return_full_text"] = False
    return prompt, history, model_input, kwargs


def reply_text(model_output) -> str:
    generated = model_output[0]["generated_text"]
    return generated[-1]["content"] if isinstance(generated, list) else generated


@app.post("/")
async def create_item(request: Request):
    json_post = await request.json()
    prompt, history, model_input, kwargs = parse(json_post)
    with generate_lock:
        model_output = generator(model_input, **kwargs)
    response = reply_text(model_output)
    history.append([prompt, response])
    now = datetime.datetime.now()
    time = now.strftime("%Y-%m-%d %H:%M:%S")
    answer = {"response": response, "history": history, "status": 200, "time": time}
    log = "[" + time + "] " + '", prompt:"' + prompt + '", response:"' + repr(response) + '"'
    print(log)
    torch_gc()
    return answer


class TokenStreamer:
    """transformers' streamer interface (`put`, `end`): hands each new token id to the HTTP response."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate's first call passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self):
        self.queue.put(None)


@app.post("/stream")
async def stream_item(request: Request):
    json_post = await request.json()
    prompt, history, model_input, kwargs = parse(json_post)
    streamer = TokenStreamer()

    def run():
        try:
            with generate_lock:
                generator(model_input, streamer=streamer, **kwargs)
        finally:
            streamer.queue.put(None)

    threading.Thread(target=run, daemon=True).start()

    def events():
        while (token := streamer.queue.get()) is not None:
            yield "data: " + json.dumps({"token": token, "text": tokenizer.decode([token])}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6006)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=DEVICE)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")
