"""SharedContextRetriever: the nodes a sharedctx ContextIndex selects for a query, as LangChain Documents."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

from sharedctx.contexts import find_index, question_text

__all__ = ["SharedContextRetriever", "citation_to_document"]

_RETRIEVE_OPTIONS = ("k", "top_k_chunks", "max_injected_states")


def citation_to_document(citation: Any) -> Document:
    """A `sharedctx.index.Citation` as a Document: the span's text, its score and where it comes from.

    ``metadata`` holds the document's own metadata (from `ContextIndex.add` or `add_text`) overlaid with the citation:
    ``doc_id``, ``chunk``, ``level``, ``index`` (the node), ``char_start``/``char_end`` (its span in the
    document's text), ``token_start``/``token_end``, ``score`` (BM25 of the node's text under the ``lexical`` policy, cosine of the node
    key with the query key under ``query``),
    ``chunk_score`` and ``n_states`` (states the node injects).
    """
    fields = citation.to_dict()
    own = fields.pop("metadata", None) or {}
    text = fields.pop("text")
    node_id = f"{fields['doc_id']}#{fields['chunk']}/{fields['level']}/{fields['index']}"
    return Document(page_content=text, metadata={**own, **fields}, id=node_id)


class SharedContextRetriever(BaseRetriever):
    """Retrieves from a `sharedctx.index.ContextIndex` by query-aware tree traversal, not embeddings.

    The index scores every chunk root against the query, keeps the best chunks, and walks each kept chunk's tree
    under its policy (``lexical``, BM25 of the text, for an index built without naming another: see
    `sharedctx.config.DEFAULT_POLICY`);
    the preserved nodes come back as Documents, best score first, each carrying its character span and score
    (see `citation_to_document`). Feed them to any chat model as text, or let `ChatSharedLLM` read the same
    nodes as injected states (`create_latent_chain`).

    Args:
        index: the ContextIndex to search.
        k: Documents (tree nodes) returned at most, best first.
        top_k_chunks: chunks walked per query (None: the index's ``top_k``); each contributes ``tree_height + 1``
            nodes, so ``k`` above that many times ``top_k_chunks`` returns fewer.
        max_injected_states: budget of states per query (None: the index's).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any = Field(exclude=True)
    k: int = Field(default=4, ge=1)
    top_k_chunks: int | None = Field(default=None, ge=1)
    max_injected_states: int | None = Field(default=None, ge=1)

    @field_validator("index")
    @classmethod
    def _check_index(cls, value: Any) -> Any:
        if find_index(value) is not value:
            raise TypeError(f"index must be a sharedctx.index.ContextIndex, got {type(value).__name__}")
        return value

    def _options(self, kwargs: dict[str, Any]) -> tuple[int, int | None, int | None]:
        unknown = sorted(set(kwargs) - set(_RETRIEVE_OPTIONS))
        if unknown:
            raise TypeError(f"SharedContextRetriever got unknown options {unknown}; it accepts {list(_RETRIEVE_OPTIONS)}")
        k = int(kwargs.get("k", self.k))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return k, kwargs.get("top_k_chunks", self.top_k_chunks), kwargs.get("max_injected_states", self.max_injected_states)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any) -> list[Document]:
        query = question_text(query, "SharedContextRetriever's query")
        k, top_k, budget = self._options(kwargs)
        if top_k is None:
            # enough chunks for k nodes: every walked chunk preserves tree_height + 1 nodes
            per_chunk = self.index.llm.config.tree_height + 1
            top_k = max(self.index.top_k, -(-k // per_chunk))
        citations = self.index.retrieve(query, top_k_chunks=top_k, max_injected_states=budget)
        return [citation_to_document(c) for c in citations[:k]]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        loop = asyncio.get_running_loop()
        sync_manager = run_manager.get_sync()
        return await loop.run_in_executor(None, lambda: self._get_relevant_documents(query, run_manager=sync_manager, **kwargs))
