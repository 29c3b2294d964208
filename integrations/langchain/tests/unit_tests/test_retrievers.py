"""SharedContextRetriever over a ContextIndex: langchain-tests' standard retriever suite (offline, tiny model) and
behaviour: Documents carry the cited spans' text, scores and citation metadata."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import RetrieversIntegrationTests

from conftest import DOCS, shared_index
from langchain_sharedctx import SharedContextRetriever


class TestSharedContextRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[SharedContextRetriever]:
        return SharedContextRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": shared_index()}

    @property
    def retriever_query_example(self) -> str:
        return "What colour is the lantern?"


def test_hierarchy():
    assert issubclass(SharedContextRetriever, BaseRetriever)
    assert SharedContextRetriever._get_relevant_documents is not BaseRetriever._get_relevant_documents
    assert SharedContextRetriever._aget_relevant_documents is not BaseRetriever._aget_relevant_documents


def test_documents_are_the_index_citations(index):
    question = "When does the night train leave?"
    docs = SharedContextRetriever(index=index, k=6).invoke(question)
    citations = index.retrieve(question, top_k_chunks=2)[:6]
    assert len(docs) == 6
    for doc, cite in zip(docs, citations):
        assert isinstance(doc, Document)
        meta = doc.metadata
        assert doc.page_content == cite.text == DOCS[meta["doc_id"]][meta["char_start"] : meta["char_end"]]
        assert (meta["doc_id"], meta["chunk"], meta["level"], meta["index"]) == (cite.doc_id, cite.chunk, cite.level, cite.index)
        assert meta["score"] == pytest.approx(cite.score) and meta["n_states"] == cite.n_states
        assert meta["topic"] == meta["doc_id"]  # the document's own metadata rides along
        assert doc.id == f"{cite.doc_id}#{cite.chunk}/{cite.level}/{cite.index}"
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)


def test_k_beyond_one_chunk_walks_more_chunks(index):
    per_chunk = index.llm.config.tree_height + 1
    docs = SharedContextRetriever(index=index, k=3 * per_chunk).invoke("flour and yeast")
    assert len(docs) == 3 * per_chunk
    assert len({(d.metadata["doc_id"], d.metadata["chunk"]) for d in docs}) == 3


async def test_async_equals_sync(index):
    retriever = SharedContextRetriever(index=index, k=3)
    sync = retriever.invoke("platform four")
    assert [d.id for d in await retriever.ainvoke("platform four")] == [d.id for d in sync]


def test_bad_arguments(index):
    with pytest.raises(TypeError, match="ContextIndex"):
        SharedContextRetriever(index="not an index")
    with pytest.raises(TypeError, match="unknown options"):
        SharedContextRetriever(index=index).invoke("q", n=3)
    with pytest.raises(ValueError):
        SharedContextRetriever(index=index, k=0)
