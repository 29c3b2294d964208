"""LangChain integration of sharedctx: a chat model that reads long contexts as injected states, a retriever over
a sharedctx ContextIndex, and the compositions that connect them."""

from __future__ import annotations

from importlib import metadata

from langchain_sharedctx.chat_models import ChatSharedLLM

try:
    __version__ = metadata.version("langchain-sharedctx")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["ChatSharedLLM", "__version__"]
