"""LangChain model classes over minicoder: `MinicoderLLM` (completion) and `ChatMinicoder` (chat).

    from minicoder.langchain import ChatMinicoder, MinicoderLLM

Built from a model directory (the engine in-process) or a server's base_url; see `models.py`.
"""

from .models import ChatMinicoder, MinicoderLLM

__all__ = ["ChatMinicoder", "MinicoderLLM"]
