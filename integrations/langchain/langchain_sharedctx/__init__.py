"""LangChain integration of sharedctx: a chat model that reads long contexts as injected states, a retriever over
a sharedctx ContextIndex, and the compositions that connect them."""

from __future__ import annotations

from importlib import metadata

from langchain_sharedctx.chains import create_hybrid_chain, create_latent_chain, create_text_chain, format_documents
from langchain_sharedctx.chat_models import ChatSharedLLM
from langchain_sharedctx.retrievers import SharedContextRetriever, citation_to_document

try:
    __version__ = metadata.version("langchain-sharedctx")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ChatSharedLLM",
    "SharedContextRetriever",
    "citation_to_document",
    "create_hybrid_chain",
    "create_latent_chain",
    "create_text_chain",
    "format_documents",
    "__version__",
]
