"""SharedContextRetriever: the tree nodes a ContextIndex selects for a query, as LlamaIndex `NodeWithScore`s."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import MetadataFilters
from llama_index.core.vector_stores.utils import build_metadata_filter_fn

from sharedctx.contexts import question_text

__all__ = ["SharedContextRetriever", "citation_to_node"]

#: citation fields a node carries in its metadata: where the span comes from, not text for an LLM or an embedding
_CITATION_KEYS = ["doc_id", "chunk", "level", "index", "char_start", "char_end", "token_start", "token_end", "chunk_score", "n_states"]


def citation_to_node(citation: Any) -> NodeWithScore:
    """A `sharedctx.index.Citation` (or its ``to_dict()``) as a scored TextNode: the span's text,
    ``start_char_idx``/``end_char_idx`` in its document, the citation (``doc_id``, ``chunk``, ``level``, ``index``,
    token span, ``chunk_score``, ``n_states``) over the document's own metadata, and a SOURCE relationship to the
    indexed node. The citation fields are excluded from what LLMs and embeddings see of the node."""
    fields = dict(citation) if isinstance(citation, Mapping) else citation.to_dict()
    own = dict(fields.pop("metadata", None) or {})
    text = fields.pop("text")
    ref_doc_id = own.get("ref_doc_id")
    node = TextNode(
        id_=f"{fields['doc_id']}#{fields['chunk']}/{fields['level']}/{fields['index']}",
        text=text,
        metadata={**own, **{k: v for k, v in fields.items() if k != "score"}},
        excluded_llm_metadata_keys=list(_CITATION_KEYS),
        excluded_embed_metadata_keys=list(_CITATION_KEYS),
        start_char_idx=fields["char_start"],
        end_char_idx=fields["char_end"],
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref_doc_id or fields["doc_id"])},
    )
    return NodeWithScore(node=node, score=float(fields["score"]))


class SharedContextRetriever(BaseRetriever):
    """Query-aware tree traversal over a `SharedContextIndex` (no embeddings): the preserved nodes of the best chunks,
    best score first, under the index's policy (``lexical``, BM25 of the nodes' text, unless the index names another).

    Args:
        index: the SharedContextIndex.
        similarity_top_k: nodes returned at most (None: every node the index selects, as a query engine reads them).
        top_k_chunks: chunks walked (None: enough for ``similarity_top_k``, at least the index's ``top_k``).
        max_injected_states: budget of states per query (None: the index's).
        filters: `MetadataFilters` on the nodes' metadata (the document's own and ``ref_doc_id``, ``doc_id``,
            ``chunk``, ...): only matching nodes are returned; more chunks are walked until enough match or none is left.
    """

    def __init__(
        self,
        index: Any,
        similarity_top_k: Optional[int] = 4,
        top_k_chunks: Optional[int] = None,
        max_injected_states: Optional[int] = None,
        filters: Optional[MetadataFilters] = None,
        callback_manager: Optional[CallbackManager] = None,
        **kwargs: Any,
    ) -> None:
        if similarity_top_k is not None and similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1 or None, got {similarity_top_k}")
        if filters is not None and not isinstance(filters, MetadataFilters):
            raise TypeError(
                f"filters must be llama_index.core.vector_stores.MetadataFilters, got {type(filters).__name__}: "
                "e.g. MetadataFilters(filters=[MetadataFilter(key='topic', value='harrow')])"
            )
        unknown = sorted(set(kwargs) - {"object_map", "objects", "verbose"})  # BaseRetriever's own
        if unknown:
            raise TypeError(
                f"SharedContextRetriever got unknown options {unknown}; it takes similarity_top_k, top_k_chunks, "
                "max_injected_states, filters (MetadataFilters) and callback_manager"
            )
        self._index = index
        self._similarity_top_k = similarity_top_k
        self._top_k_chunks = top_k_chunks
        self._max_injected_states = max_injected_states
        self._filters = filters
        super().__init__(callback_manager=callback_manager, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        question = question_text(query_bundle.query_str, "the query")
        ctx = self._index.context_index
        top_k = self._top_k_chunks
        if top_k is None:
            per_chunk = ctx.llm.config.tree_height + 1
            top_k = max(ctx.top_k, -(-(self._similarity_top_k or 1) // per_chunk))
        nodes = self._walk(ctx, question, top_k)
        if self._filters is not None:
            total = sum(d.chunks for d in ctx.documents())
            while len(nodes) < (self._similarity_top_k or 1) and top_k < total:  # walk more chunks until enough match
                top_k = min(2 * top_k, total)
                nodes = self._walk(ctx, question, top_k)
        return nodes if self._similarity_top_k is None else nodes[: self._similarity_top_k]

    def _walk(self, ctx: Any, question: str, top_k: int) -> List[NodeWithScore]:
        nodes = [citation_to_node(c) for c in ctx.retrieve(question, top_k_chunks=top_k, max_injected_states=self._max_injected_states)]
        if self._filters is None:
            return nodes
        by_id = {n.node.node_id: n.node.metadata for n in nodes}
        keep = build_metadata_filter_fn(lambda node_id: by_id[node_id], self._filters)
        return [n for n in nodes if keep(n.node.node_id)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._retrieve, query_bundle)
