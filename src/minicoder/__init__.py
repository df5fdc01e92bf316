"""minicoder: build a code LLM from scratch and take it all the way to use."""

__version__ = "0.1.0"
