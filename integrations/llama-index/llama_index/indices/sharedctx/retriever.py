"""SharedContextRetriever: the tree nodes a ContextIndex selects for a query, as LlamaIndex `NodeWithScore`s."""

from __future__ import annotations

from typing import Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

__all__ = ["SharedContextRetriever", "citation_to_node"]


def citation_to_node(citation: Any) -> NodeWithScore:
    """A `sharedctx.index.Citation` as a scored TextNode: the span's text, ``start_char_idx``/``end_char_idx`` in
    its document, the citation (``doc_id``, ``chunk``, ``level``, ``index``, token span, ``chunk_score``,
    ``n_states``) over the document's own metadata, and a SOURCE relationship to the indexed node."""
    fields = citation.to_dict()
    own = dict(fields.pop("metadata", None) or {})
    text = fields.pop("text")
    ref_doc_id = own.get("ref_doc_id")
    node = TextNode(
        id_=f"{fields['doc_id']}#{fields['chunk']}/{fields['level']}/{fields['index']}",
        text=text,
        metadata={**own, **{k: v for k, v in fields.items() if k != "score"}},
        start_char_idx=fields["char_start"],
        end_char_idx=fields["char_end"],
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref_doc_id or fields["doc_id"])},
    )
    return NodeWithScore(node=node, score=float(fields["score"]))


class SharedContextRetriever(BaseRetriever):
    """Query-aware tree traversal over a `SharedContextIndex` (no embeddings): the preserved nodes of the best chunks,
    best score first.

    Args:
        index: the SharedContextIndex.
        similarity_top_k: nodes returned at most.
        top_k_chunks: chunks walked (None: enough for ``similarity_top_k``, at least the index's ``top_k``).
        max_injected_states: budget of states per query (None: the index's).
    """

    def __init__(
        self,
        index: Any,
        similarity_top_k: int = 4,
        top_k_chunks: Optional[int] = None,
        max_injected_states: Optional[int] = None,
        callback_manager: Optional[CallbackManager] = None,
        **kwargs: Any,
    ) -> None:
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        self._index = index
        self._similarity_top_k = similarity_top_k
        self._top_k_chunks = top_k_chunks
        self._max_injected_states = max_injected_states
        super().__init__(callback_manager=callback_manager, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        ctx = self._index.context_index
        top_k = self._top_k_chunks
        if top_k is None:
            per_chunk = ctx.llm.config.tree_height + 1
            top_k = max(ctx.top_k, -(-self._similarity_top_k // per_chunk))
        citations = ctx.retrieve(query_bundle.query_str, top_k_chunks=top_k, max_injected_states=self._max_injected_states)
        return [citation_to_node(c) for c in citations[: self._similarity_top_k]]

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._retrieve, query_bundle)
