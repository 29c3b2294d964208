"""LlamaIndex index integration of sharedctx: ``from llama_index.indices.sharedctx import SharedContextIndex``."""

from llama_index.indices.sharedctx.base import SharedContextIndex
from llama_index.indices.sharedctx.query_engine import SharedContextQueryEngine, SharedContextSynthesizer
from llama_index.indices.sharedctx.retriever import SharedContextRetriever, citation_to_node

__all__ = ["SharedContextIndex", "SharedContextQueryEngine", "SharedContextRetriever", "SharedContextSynthesizer", "citation_to_node"]
