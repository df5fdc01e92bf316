"""Generation: the serving engine (continuous batching over a paged KV cache) and its parts."""

from .async_engine import AsyncEngine
from .engine import Engine, EngineConfig, EngineStats, QueueFull
from .prompts import FimFormat, PromptBuilder, find_fim_format
from .request import RequestFailed, RequestOutput, TokenLogprob
from .guided import GuidedDecoding
from .sampling_params import SamplingParams
from .speculation import SpeculativeConfig

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineStats", "FimFormat", "GuidedDecoding", "PromptBuilder",
           "QueueFull", "RequestFailed", "RequestOutput", "SamplingParams", "SpeculativeConfig", "TokenLogprob",
           "find_fim_format"]
