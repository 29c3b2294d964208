"""SharedContextIndex: a LlamaIndex index over a sharedctx ContextIndex (a forest of compressed context trees)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llama_index.core.callbacks import CallbackManager
from llama_index.core.data_structs.data_structs import IndexList
from llama_index.core.data_structs.registry import INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS
from llama_index.core.indices.base import BaseIndex
from llama_index.core.indices.registry import INDEX_STRUCT_TYPE_TO_INDEX_CLASS
from llama_index.core.ingestion import run_transformations
from llama_index.core.schema import BaseNode, Document, MetadataMode, NodeRelationship, TextNode, TransformComponent
from llama_index.core.settings import Settings
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.storage_context import StorageContext
from llama_index.core.utils import get_tqdm_iterable

__all__ = ["SharedContextIndex", "SharedContextIndexStruct"]

logger = logging.getLogger(__name__)

_LEGACY_STORAGE_DIR = "llama_index"  # where persist wrote the docstore / index store before they moved to the top
_EMPTY = "the document is empty (no text to index)"
_OPEN_WITH = (
    "a SharedContextIndex keeps its documents in a sharedctx ContextIndex directory, which a StorageContext does not "
    "name: open it with SharedContextIndex.from_persist_dir(persist_dir, llm=...) "
    "(from llama_index.indices.sharedctx import SharedContextIndex), not load_index_from_storage"
)


@dataclass
class SharedContextIndexStruct(IndexList):
    """The node ids of a SharedContextIndex, persisted under their own type so that LlamaIndex's
    ``load_index_from_storage`` does not mistake them for a SummaryIndex's list."""

    @classmethod
    def get_type(cls) -> Any:  # a str, not an IndexStructType member: that enum is closed
        return "SharedContextIndex"


def _resolve_llm(llm: Any) -> Any:
    """A `sharedctx.SharedLLM` from one, from a `llama_index.llms.sharedctx.SharedLLM`, or the default model."""
    import sharedctx

    if isinstance(llm, sharedctx.SharedLLM):
        return llm
    if llm is not None and callable(getattr(llm, "get_llm", None)):
        return llm.get_llm()
    if llm is None:
        from sharedctx.contexts import load_llm

        return load_llm()
    raise TypeError(
        f"SharedContextIndex reads with a SharedLLM, got {type(llm).__name__}: pass a sharedctx.SharedLLM or "
        "llama_index.llms.sharedctx.SharedLLM (any other LLM can still use as_retriever())"
    )


def _as_node(document: Document) -> TextNode:
    """One node per document: the ContextIndex chunks documents by itself (edit-stable, content-addressed)."""
    return TextNode(
        id_=f"{document.id_}#sharedctx",
        text=document.get_content(metadata_mode=MetadataMode.NONE),
        metadata=dict(document.metadata),
        excluded_embed_metadata_keys=list(document.excluded_embed_metadata_keys),
        excluded_llm_metadata_keys=list(document.excluded_llm_metadata_keys),
        relationships={NodeRelationship.SOURCE: document.as_related_node_info()},
    )


def _has_text(item: BaseNode) -> bool:
    return bool(item.get_content(metadata_mode=MetadataMode.NONE).strip())


class SharedContextIndex(BaseIndex[IndexList]):
    """Documents as a forest of compressed context trees, queried by tree traversal and read by latent injection.

    Each node (by default one per Document: no text splitter runs, the `ContextIndex` chunks documents by
    itself) becomes a ContextIndex document whose chunks are encoded once into a content-addressed `TreeStore`.
    ``as_retriever()`` returns the tree nodes a query selects as `NodeWithScore`s (spans and scores; usable with
    any LLM); ``as_query_engine()`` answers with the model reading those nodes as **injected states**. A node with
    no text (an empty Document) is skipped, logged and listed in ``skipped``; the others are indexed as usual.

    Args:
        nodes: nodes to index (use `from_documents` for Documents).
        llm: a `sharedctx.SharedLLM` or `llama_index.llms.sharedctx.SharedLLM` (None: the default model).
        store: the ContextIndex directory (None: a temporary one; `persist` copies it).
        context_index: an existing `sharedctx.index.ContextIndex` to wrap instead (``llm``/``store`` unused).
        top_k, max_injected_states, expand_margin: options of the ContextIndex (see its documentation).
        policy: how chunks are ranked and trees walked for a query. Default: the model's ``config.policy``, which is
            ``lexical`` (BM25 of the nodes' text, `sharedctx.config.DEFAULT_POLICY`) unless the model was built with
            another; a reopened index keeps the policy it was built with. ``query`` (the paper's cosine of
            hidden-state keys) and the adapter's own training policy apply only when named here.
        encode: ``eager`` (default) encodes every chunk as it is added; ``lazy`` (``lexical`` only) stores text and
            encodes a chunk the first time an answer injects it.
    """

    index_struct_cls = SharedContextIndexStruct

    def __init__(
        self,
        nodes: Optional[Sequence[BaseNode]] = None,
        index_struct: Optional[IndexList] = None,
        storage_context: Optional[StorageContext] = None,
        callback_manager: Optional[CallbackManager] = None,
        transformations: Optional[List[TransformComponent]] = None,
        show_progress: bool = False,
        *,
        llm: Any = None,
        store: str | os.PathLike | None = None,
        context_index: Any = None,
        top_k: int = 8,
        max_injected_states: int | None = None,
        expand_margin: float | None = None,
        policy: str | None = None,
        encode: str = "eager",
        **kwargs: Any,
    ) -> None:
        if context_index is None and index_struct is not None:
            raise ValueError(_OPEN_WITH)  # load_index_from_storage: the StorageContext alone cannot find the documents
        if context_index is None:
            from sharedctx.index import ContextIndex

            context_index = ContextIndex(
                _resolve_llm(llm), store, top_k=top_k, max_injected_states=max_injected_states, expand_margin=expand_margin,
                policy=policy, encode=encode,
            )
        self.context_index = context_index
        #: the llama_index SharedLLM the index was built with (its generation settings are the query engine's defaults)
        self.llm_settings = llm if llm is not None and not isinstance(llm, str) and callable(getattr(llm, "get_llm", None)) else None
        self.build_reports: list[Any] = []  # AddResult of every node added (chunks encoded / reused)
        self.skipped: list[tuple[str, str]] = []  # (document id, why) of every node not indexed (empty text)
        super().__init__(
            nodes=nodes,
            index_struct=index_struct,
            storage_context=storage_context,
            callback_manager=callback_manager,
            transformations=transformations,
            show_progress=show_progress,
            **kwargs,
        )
        self._transformations = list(transformations or [])  # not Settings.transformations: no text splitter

    @property
    def llm(self) -> Any:
        """The `sharedctx.SharedLLM` that encodes and reads."""
        return self.context_index.llm

    # ------------------------------------------------------------------ building
    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        storage_context: Optional[StorageContext] = None,
        show_progress: bool = False,
        callback_manager: Optional[CallbackManager] = None,
        transformations: Optional[List[TransformComponent]] = None,
        **kwargs: Any,
    ) -> "SharedContextIndex":
        """Index Documents, one ContextIndex document each (``transformations``, when given, split them first)."""
        storage_context = storage_context or StorageContext.from_defaults()
        callback_manager = callback_manager or Settings.callback_manager
        with callback_manager.as_trace("index_construction"):
            for doc in documents:
                if _has_text(doc):  # an empty one is skipped (and reported) when the nodes are built
                    storage_context.docstore.set_document_hash(doc.id_, doc.hash)
            nodes = cls._nodes_for(documents, transformations, show_progress)
        return cls(
            nodes=nodes,
            storage_context=storage_context,
            callback_manager=callback_manager,
            show_progress=show_progress,
            transformations=transformations,
            **kwargs,
        )

    @staticmethod
    def _nodes_for(documents: Sequence[Document], transformations: Optional[List[TransformComponent]], show_progress: bool) -> List[BaseNode]:
        if transformations:
            return run_transformations(list(documents), transformations, show_progress=show_progress)
        return [_as_node(d) for d in documents]

    def _indexable(self, nodes: Sequence[BaseNode]) -> List[BaseNode]:
        """``nodes`` less those with no text, each logged and listed in ``skipped`` by its document's id."""
        kept = []
        for node in nodes:
            if _has_text(node):
                kept.append(node)
            else:
                self._skip(node, _EMPTY)
        return kept

    def _skip(self, node: BaseNode, reason: str) -> None:
        doc_id = node.ref_doc_id or node.node_id
        logger.warning("SharedContextIndex: skipping document %r: %s", doc_id, reason)
        self.skipped.append((doc_id, reason))

    def build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> IndexList:
        return super().build_index_from_nodes(self._indexable(nodes), **build_kwargs)

    def insert_nodes(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        super().insert_nodes(self._indexable(nodes), **insert_kwargs)

    def _add_nodes(self, nodes: Sequence[BaseNode], index_struct: IndexList, show_progress: bool) -> None:
        for node in get_tqdm_iterable(nodes, show_progress, "Encoding documents"):
            metadata = dict(node.metadata)
            if node.ref_doc_id is not None:
                metadata.setdefault("ref_doc_id", node.ref_doc_id)
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            self.build_reports.append(self.context_index.add_text(text, doc_id=node.node_id, metadata=metadata))
            if node.node_id not in index_struct.nodes:
                index_struct.add_node(node)

    def _build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> IndexList:
        index_struct = SharedContextIndexStruct()
        self._add_nodes(nodes, index_struct, self._show_progress)
        return index_struct

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        self._add_nodes(nodes, self._index_struct, False)

    def insert(self, document: Document, **insert_kwargs: Any) -> None:
        """Add one Document (one ContextIndex document; chunks already in the store are not encoded again)."""
        with self._callback_manager.as_trace("insert"):
            nodes = self._nodes_for([document], self._transformations, self._show_progress)
            self.insert_nodes(nodes, **insert_kwargs)
            if _has_text(document):
                self.docstore.set_document_hash(document.id_, document.hash)

    async def ainsert(self, document: Document, **insert_kwargs: Any) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, lambda: self.insert(document, **insert_kwargs))

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        if node_id in self.context_index:
            self.context_index.delete(node_id)
        if node_id in self._index_struct.nodes:
            self._index_struct.nodes.remove(node_id)

    @property
    def ref_doc_info(self) -> Dict[str, RefDocInfo]:
        """Ingested documents: ref doc id -> the ids of its nodes and its metadata."""
        out: Dict[str, RefDocInfo] = {}
        for node in self.docstore.get_nodes(list(self._index_struct.nodes)):
            ref = node.source_node
            if ref is None:
                continue
            info = self.docstore.get_ref_doc_info(ref.node_id)
            if info is not None:
                out[ref.node_id] = info
        return out

    # ------------------------------------------------------------------ persistence
    def persist(self, persist_dir: str | os.PathLike) -> Path:
        """Write the index to ``persist_dir``: the ContextIndex (node store and document table) and, next to it,
        LlamaIndex's docstore / index store. Reopen with `from_persist_dir` (``load_index_from_storage`` cannot
        find the ContextIndex from a StorageContext, so it raises an error naming `from_persist_dir`)."""
        path = self.context_index.persist(persist_dir)
        self.storage_context.persist(persist_dir=str(persist_dir))
        return Path(path)

    @classmethod
    def from_persist_dir(cls, persist_dir: str | os.PathLike, llm: Any = None, **kwargs: Any) -> "SharedContextIndex":
        """Open an index written by `persist` (refused when ``llm`` is another base model or configuration)."""
        from sharedctx.index import ContextIndex

        options = {k: kwargs.pop(k) for k in ("top_k", "max_injected_states", "expand_margin", "policy", "encode") if k in kwargs}
        context_index = ContextIndex.load(persist_dir, _resolve_llm(llm), **options)
        storage_dir = Path(persist_dir)
        if not (storage_dir / "index_store.json").is_file() and (storage_dir / _LEGACY_STORAGE_DIR).is_dir():
            storage_dir = storage_dir / _LEGACY_STORAGE_DIR
        storage_context = StorageContext.from_defaults(persist_dir=str(storage_dir))
        structs = storage_context.index_store.index_structs()
        if len(structs) != 1 or not isinstance(structs[0], IndexList):
            raise ValueError(f"{persist_dir} does not hold one SharedContextIndex (found {len(structs)} index structs)")
        struct = structs[0]
        if not isinstance(struct, SharedContextIndexStruct):  # persisted as a plain list before it had its own type
            struct = SharedContextIndexStruct(index_id=struct.index_id, summary=struct.summary, nodes=list(struct.nodes))
        return cls(index_struct=struct, storage_context=storage_context, context_index=context_index, llm=llm, **kwargs)

    # ------------------------------------------------------------------ retrieval and answers
    def as_retriever(self, **kwargs: Any) -> Any:
        """A retriever returning the selected tree nodes as `NodeWithScore`s (see `SharedContextRetriever`):
        ``similarity_top_k`` (4), ``top_k_chunks``, ``max_injected_states``, ``filters`` (`MetadataFilters`)."""
        from .retriever import SharedContextRetriever

        kwargs.setdefault("callback_manager", self._callback_manager)
        return SharedContextRetriever(self, **kwargs)

    def as_query_engine(self, llm: Any = None, **kwargs: Any) -> Any:
        """A query engine over this index (see `SharedContextQueryEngine` for the options of each mode).

        ``mode``: ``hybrid`` (default, `sharedctx.config.DEFAULT_MODE`), ``text`` or ``latent``. ``llm``: a
        `llama_index.llms.sharedctx.SharedLLM` over this index's model, whose settings (``max_new_tokens``,
        ``temperature``, ...) the answers use; None: the SharedLLM the index was built with, else ``Settings.llm`` when
        it is one, else this index's model with default settings. In ``text`` mode any other LLM works too (the
        engine is then LlamaIndex's own RetrieverQueryEngine over this index's retriever). Keyword arguments of
        ``RetrieverQueryEngine.from_args`` (``response_mode``, ``text_qa_template``, ``node_postprocessors``,
        ``response_synthesizer``, ...) apply in ``text`` and ``hybrid`` modes.
        """
        from .query_engine import SharedContextQueryEngine

        kwargs.setdefault("callback_manager", self._callback_manager)
        return SharedContextQueryEngine(self, llm=llm, **kwargs)


# load_index_from_storage finds the class by the persisted struct's type: this one raises an error naming from_persist_dir
INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS.setdefault(SharedContextIndexStruct.get_type(), SharedContextIndexStruct)
INDEX_STRUCT_TYPE_TO_INDEX_CLASS.setdefault(SharedContextIndexStruct.get_type(), SharedContextIndex)
