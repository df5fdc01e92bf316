"""The minicoder transformer: the Llama architecture, readable top to bottom.

RMSNorm, rotary position embeddings (Hugging Face `rotate_half` layout), grouped-query attention,
SwiGLU MLP, optional tied embeddings. Parameter names equal `transformers.LlamaForCausalLM`'s, so a
checkpoint directory written by `save_pretrained` loads in stock `transformers` (and therefore in
vLLM, llama.cpp via GGUF, LMDeploy) with no conversion, and parity with `transformers` is a test.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinicoderError


class UnsupportedModel(MinicoderError):
    """A valid checkpoint whose config this native implementation does not cover (the serving engine then
    runs it through transformers)."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # linear RoPE scaling (DeepSeek-Coder 1.3B/6.7B use 4.0): positions / factor
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style:
        6 x the parameters that take part in matmuls (every Linear and the lm_head, not the embedding
        lookup) plus 12 * layers * hidden * seq_len for attention scores and weighted values."""
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        matmul_params = L * (2 * h * h + 2 * h * kv + 3 * h * f) + v * h
        return 6 * matmul_params + 12 * L * h * seq_len

    # --- Hugging Face config.json -------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = asdict(self)
        del d["rope_linear_factor"]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_linear_factor != 1.0:
            rope = {"rope_type": "linear", "factor": self.rope_linear_factor, "rope_theta": self.rope_theta}
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            head_dim=self.head_dim,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            initializer_range=0.02,
            pretraining_tp=1,
            use_cache=True,
            torch_dtype="float32",
            # transformers >= 5 reads rope_parameters; older versions read rope_theta (kept above).
            rope_parameters=rope,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))  # transformers 4.x wrote "type"
        if rope_type == "linear":
            d["rope_linear_factor"] = float(rope["factor"])
        elif rope_type not in ("default", None):
            raise UnsupportedModel(f"rope_type {rope_type!r} is not supported by the native model")
        if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise UnsupportedModel("head_dim != hidden_size / num_attention_heads is not supported by the native model")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 like transformers does, then cast back: bf16 variance loses too much.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for each position, shape positions.shape + (head_dim,), in the rotate_half layout."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd))
    angles = (positions.float() / config.rope_linear_factor)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """A contiguous per-layer key/value cache: (batch, kv_heads, max_len, head_dim) per layer.

    `write` stores new keys/values at `start` and returns the full prefix to attend to. The paged
    cache of the serving engine implements the same two methods.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, config.hidden_size, bias=False)
        self.kv_cache_dtype = "auto"  # int8/int4: keys and values pass the serving cache's quantization

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache_dtype != "auto":
            from .quant.kv import round_trip

            k, v = round_trip(k, self.kv_cache_dtype), round_trip(v, self.kv_cache_dtype)
        if cache is not None:
            k, v = cache.write(self.layer_idx, start, k, v)
        S = k.shape[2]
        if T == S:  # no cached prefix: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:  # new queries sit at positions start..start+T-1 of S keys
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack; named `model` inside the causal LM, as in transformers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual output projections by 1/sqrt(2 * layers) for stable depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def hidden_states(self, input_ids, positions=None, cache: KVCache | None = None, start: int = 0):
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_tables(self.config, positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, cache: KVCache | None = None, start: int = 0, last_only=False):
        """Logits for each position (or only the last one, which is all generation needs)."""
        h = self.hidden_states(input_ids, positions, cache, start)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def set_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """Compute attention on keys/values as an int8/int4 KV cache would hold them ("auto": as computed)."""
        from .quant.kv import check_kv_cache_dtype

        check_kv_cache_dtype(kv_cache_dtype, self.config.head_dim)
        for layer in self.model.layers:
            layer.self_attn.kv_cache_dtype = kv_cache_dtype

    # --- Hugging Face model directory ---------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype = torch.float32):
        from safetensors.torch import save_file

        from .quant.apply import is_quantized

        if is_quantized(self):
            raise MinicoderError("a quantized model is saved by `minicoder quantize`, not save_pretrained")

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # transformers re-ties it from embed_tokens
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        cfg = self.config.to_hf_dict()
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id, "do_sample": False}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "LlamaForCausalLM":
        """Load a minicoder or Hugging Face Llama-family model directory (safetensors, one or many shards)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise MinicoderError(f"{path}: not a model directory (no config.json)")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise MinicoderError(f"{cfg_file}: invalid JSON ({e})") from None
        if hf.get("model_type") not in ("llama", "mistral", None):
            raise UnsupportedModel(f"{cfg_file}: model_type {hf.get('model_type')!r} is not a Llama-family model")
        try:
            config = ModelConfig.from_hf_dict(hf)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{cfg_file}: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise MinicoderError(f"{cfg_file}: unsupported config ({e})") from None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MinicoderError(f"{path}: no *.safetensors weights")
        state = {}
        for f in files:
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise MinicoderError(f"{f}: cannot read weights ({e}); the file is truncated or corrupt") from None
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = cls(config)
        quantized = set()
        if hf.get("quantization_config"):  # AWQ int4 / minicoder int8 layers instead of nn.Linear
            from .quant.checkpoint import load_quantized_weights, read_quantization_config

            load_quantized_weights(model, state, *read_quantization_config(hf, cfg_file), dtype=dtype)
            quantized = {k for k, _ in model.named_buffers()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight") and m not in quantized]
        unexpected = [u for u in unexpected if "rotary_emb" not in u]
        if missing or unexpected:
            raise MinicoderError(f"{path}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(dtype).eval()
