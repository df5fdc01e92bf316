"""Byte-level BPE tokenizer: training in bounded memory, special tokens, chat template, FIM prompts.

The tokenizer is a `tokenizers` byte-level BPE with GPT-2's split pattern (llama.cpp implements it as the
`gpt-2` pre-tokenizer, so a GGUF export tokenizes identically), saved in Hugging Face format so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it. Special tokens follow DeepSeek-Coder, so tools
configured for DeepSeek-Coder's FIM and chat formats work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .errors import MinicoderError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"  # marks the prefix
FIM_HOLE = "<｜fim▁hole｜>"  # marks the suffix
FIM_END = "<｜fim▁end｜>"  # the middle follows
EOT = "<|EOT|>"  # end of a chat turn
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END, EOT, PAD]  # ids 0..6 in this order

DEFAULT_SYSTEM = "You are minicoder, an AI programming assistant. You answer questions about code."

# DeepSeek-Coder-instruct layout: optional system text, `### Instruction:` / `### Response:` turns,
# each assistant turn closed by <|EOT|>. SFT masks everything except the assistant content and its <|EOT|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n' }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{{ '" + DEFAULT_SYSTEM + "\\n' }}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' + message['content'] + '\\n" + EOT + "\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train byte-level BPE on an iterator of texts (the caller bounds how much it yields)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like DeepSeek-Coder and Llama: `encode(text)` starts with BOS; add_special_tokens=False omits it.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer(tok: HFTokenizer, out_dir: str | Path, model_max_length: int = 4096) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (Hugging Face format)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": [FIM_BEGIN, FIM_HOLE, FIM_END, EOT],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must return the text unchanged
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


class Tokenizer:
    """A loaded tokenizer: fast batch encoding for data work, special-token ids, FIM prompt building."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise MinicoderError(f"{self.path}: no tokenizer.json (train one with `minicoder tokenizer train`)")
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise MinicoderError(f"{file}: cannot load tokenizer ({e})") from None
        # Text is always data: code that spells `<|EOT|>` encodes as plain bytes, never as the control token.
        # Control tokens enter only as ids (fim_prompt, packing) or through the chat template.
        self.tok.encode_special_tokens = True
        missing = [t for t in SPECIAL_TOKENS if self.tok.token_to_id(t) is None]
        if missing:
            raise MinicoderError(f"{file}: missing special tokens {missing}")
        self.bos_id, self.eos_id = self.tok.token_to_id(BOS), self.tok.token_to_id(EOS)
        self.fim_begin_id, self.fim_hole_id = self.tok.token_to_id(FIM_BEGIN), self.tok.token_to_id(FIM_HOLE)
        self.fim_end_id, self.eot_id, self.pad_id = (self.tok.token_to_id(t) for t in (FIM_END, EOT, PAD))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """PSM infilling prompt: BOS <fim_begin> prefix <fim_hole> suffix <fim_end>; the model writes the middle."""
        return [self.bos_id, self.fim_begin_id, *self.encode(prefix), self.fim_hole_id, *self.encode(suffix), self.fim_end_id]

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation laid out exactly as CHAT_TEMPLATE renders it, and a mask that is True
        on the tokens SFT trains on: each assistant reply and the <|EOT|> that closes it.

        Pieces are tokenized separately, split where a reply starts, which is also how generation sees them
        (the prompt ends at "### Response:\n", the reply's tokens follow), and <|EOT|> enters as its id.
        """
        ids, mask = [self.bos_id], [False]

        def add(text: str, train: bool):
            piece = self.encode(text)
            ids.extend(piece)
            mask.extend([train] * len(piece))

        if messages and messages[0]["role"] == "system":
            add(messages[0]["content"] + "\n", False)
            messages = messages[1:]
        else:
            add(DEFAULT_SYSTEM + "\n", False)
        for message in messages:
            if message["role"] == "user":
                add("### Instruction:\n" + message["content"] + "\n", False)
            elif message["role"] == "assistant":
                add("### Response:\n", False)
                add(message["content"] + "\n", True)
                ids.append(self.eot_id)
                mask.append(True)
                add("\n", False)
        if add_generation_prompt:
            add("### Response:\n", False)
        return ids, mask

    def fingerprint(self) -> str:
        """A short hash of tokenizer.json, recorded in packed-data metadata to catch mismatched tokenizers."""
        return hashlib.sha256((self.path / "tokenizer.json").read_bytes()).hexdigest()[:16]


def corpus_texts(corpus_dir: str | Path, max_bytes: int, chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Yield up to `max_bytes` of documents from a corpus directory, in chunks of ~64K characters.

    Chunking keeps the trainer's per-item memory small; the byte budget bounds the whole sample, which
    is what keeps tokenizer training memory flat however large the corpus is (minimind's needed 95 GB).
    Documents are sampled evenly across the corpus by a stride, not just the first ones.
    """
    docs_dir = Path(corpus_dir) / "docs"
    shards = sorted(docs_dir.glob("shard-*.jsonl"))
    if not shards:
        raise MinicoderError(f"{docs_dir}: no shard-*.jsonl documents (build a corpus with `minicoder data corpus`)")
    total = sum(os.path.getsize(s) for s in shards)
    keep_every = max(1, round(total / max_bytes))  # stride so the sample spans the whole corpus
    used = 0
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i % keep_every:
                    continue
                text = json.loads(line)["text"]
                for start in range(0, len(text), chunk_chars):
                    chunk = text[start : start + chunk_chars]
                    used += len(chunk.encode("utf-8"))
                    yield chunk
                    if used >= max_bytes:
                        return
