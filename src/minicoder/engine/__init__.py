"""Generation: the serving engine (continuous batching over a paged KV cache) and its parts."""

from .async_engine import AsyncEngine, RequestFailed
from .engine import Engine, EngineConfig, EngineStats, QueueFull
from .prompts import FimFormat, PromptBuilder, find_fim_format
from .request import RequestOutput, TokenLogprob
from .sampling import SamplingParams

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineStats", "FimFormat", "PromptBuilder", "QueueFull",
           "RequestFailed", "RequestOutput", "SamplingParams", "TokenLogprob", "find_fim_format"]
