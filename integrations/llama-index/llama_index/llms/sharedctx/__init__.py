"""LlamaIndex LLM integration of sharedctx: ``from llama_index.llms.sharedctx import SharedLLM``."""

from llama_index.llms.sharedctx.base import SharedLLM

__all__ = ["SharedLLM"]
