"""SharedContextIndex on a tiny model: building, ref_doc_info, insert / delete_ref_doc, persistence, the retriever's
NodeWithScores, and the query engine end to end: the model receives injected states for the query, not the spans."""

from __future__ import annotations

import pytest
from llama_index.core import Document
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.schema import NodeWithScore

from conftest import DOCS, Spy, contains, documents
from llama_index.indices.sharedctx import SharedContextIndex
from llama_index.llms.sharedctx import SharedLLM

QUESTION = "What colour is the lantern of the Harrow Point light?"


def test_from_documents_builds_one_context_document_each(index):
    assert set(index.ref_doc_info) == set(DOCS)
    for ref_id, info in index.ref_doc_info.items():
        assert info.node_ids == [f"{ref_id}#sharedctx"] and info.metadata["topic"] == ref_id
    docs = {d.doc_id: d for d in index.context_index.documents()}
    assert set(docs) == {f"{k}#sharedctx" for k in DOCS}
    assert all(r.chunks_encoded == r.chunks and r.chunks > 1 for r in index.build_reports)


def test_retriever_returns_spans_and_scores(index):
    nodes = index.as_retriever(similarity_top_k=5).retrieve(QUESTION)
    assert len(nodes) == 5 and all(isinstance(n, NodeWithScore) for n in nodes)
    scores = [n.score for n in nodes]
    assert scores == sorted(scores, reverse=True)
    citations = index.context_index.retrieve(QUESTION, top_k_chunks=2)[:5]
    for n, c in zip(nodes, citations):
        meta = n.node.metadata
        ref = meta["ref_doc_id"]
        assert n.node.text == DOCS[ref][n.node.start_char_idx : n.node.end_char_idx] == c.text
        assert (meta["chunk"], meta["level"], meta["index"], meta["n_states"]) == (c.chunk, c.level, c.index, c.n_states)
        assert n.node.source_node.node_id == ref and meta["topic"] == ref
    assert len(index.as_retriever(similarity_top_k=12).retrieve(QUESTION)) == 12  # walks more chunks when asked


async def test_retriever_async(index):
    retriever = index.as_retriever(similarity_top_k=3)
    assert [n.node.node_id for n in await retriever.aretrieve("platform four")] == [n.node.node_id for n in retriever.retrieve("platform four")]


def test_query_engine_answers_by_latent_injection(index, llm):
    engine = index.as_query_engine(mode="latent", max_new_tokens=8)
    with Spy(llm) as spy:
        response = engine.query(QUESTION)
    assert isinstance(response, Response)
    (call,) = spy.calls
    injection = call["injection"]
    assert injection is not None and injection.n_states > 0
    prompt = list(call["prompt"])
    question_ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt == list(question_ids)  # the question only
    for node in response.source_nodes:
        if len(node.node.text) >= 8 and node.node.text not in QUESTION:
            assert not contains(prompt, llm.tokenizer(node.node.text, add_special_tokens=False)["input_ids"])
    # the source nodes are exactly what was injected
    assert sum(n.node.metadata["n_states"] for n in response.source_nodes) == injection.n_states
    assert response.metadata["stats"]["injected_states"] == injection.n_states
    assert response.response == index.context_index.query(QUESTION, mode="latent", max_new_tokens=8).text
    # the states change the answer: the bare model says something else
    assert response.response != SharedLLM(llm=llm, max_new_tokens=8).complete(QUESTION).text


def test_query_engine_text_mode_prompts_the_spans(index, llm):
    engine = index.as_query_engine(mode="text", max_new_tokens=4)
    with Spy(llm) as spy:
        response = engine.query(QUESTION)
    assert spy.calls[0]["injection"] is None
    best = max(response.source_nodes, key=lambda n: n.score)
    assert best.node.text.strip() in llm.tokenizer.decode(spy.calls[0]["prompt"])  # the prompt's ids, tokenised once


def test_query_engine_streams_and_counts_tokens(index, llm):
    counter = TokenCountingHandler(tokenizer=lambda text: [0])
    engine = index.as_query_engine(streaming=True, max_new_tokens=6, callback_manager=CallbackManager([counter]))
    response = engine.query(QUESTION)
    assert isinstance(response, StreamingResponse)
    text = "".join(response.response_gen)
    assert text == index.as_query_engine(max_new_tokens=6).query(QUESTION).response
    assert response.source_nodes and response.metadata["stats"]["injected_states"] > 0
    assert counter.completion_llm_token_count == response.metadata["stats"]["generated_tokens"] == 6


async def test_query_engine_async(index):
    engine = index.as_query_engine(max_new_tokens=5)
    assert (await engine.aquery(QUESTION)).response == engine.query(QUESTION).response


def test_llm_reads_an_index_through_chat(index, llm):
    lm = SharedLLM(llm=llm, max_new_tokens=6, context=index, mode="latent")
    messages = [ChatMessage(role="system", content="One word."), ChatMessage(role="user", content=QUESTION)]
    with Spy(llm) as spy:
        r = lm.chat(messages)
    assert spy.calls[0]["prompt"] == lm.prompt_ids(messages) and spy.calls[0]["injection"].n_states > 0
    assert r.additional_kwargs["citations"] and r.additional_kwargs["injected_states"] > 0
    # a sampling top_k reaches the sampler; it does not change how many chunks the index injects
    with Spy(llm) as spy:
        lm.complete(QUESTION, top_k=5, temperature=1.0, seed=1)
    assert spy.calls[0]["options"].top_k == 5 and spy.calls[0]["injection"].n_states == r.additional_kwargs["injected_states"]


def test_insert_delete_and_persist(llm, tmp_path):
    idx = SharedContextIndex.from_documents(documents()[:2], llm=llm, store=tmp_path / "live", show_progress=True)
    before = [n.node.node_id for n in idx.as_retriever(similarity_top_k=4).retrieve(QUESTION)]
    # inserting a document whose text is already indexed encodes nothing
    idx.insert(Document(text=DOCS["harrow"], id_="harrow-copy"))
    assert idx.build_reports[-1].chunks_encoded == 0 and idx.build_reports[-1].chunks_reused > 0
    idx.insert(Document(text=DOCS["trains"], id_="trains"))
    assert set(idx.ref_doc_info) == {"harrow", "bread", "harrow-copy", "trains"}
    idx.delete_ref_doc("harrow-copy", delete_from_docstore=True)
    assert set(idx.ref_doc_info) == {"harrow", "bread", "trains"}
    assert "harrow-copy#sharedctx" not in idx.context_index
    idx.delete_ref_doc("trains")
    assert [n.node.node_id for n in idx.as_retriever(similarity_top_k=4).retrieve(QUESTION)] == before

    idx.persist(tmp_path / "saved")
    loaded = SharedContextIndex.from_persist_dir(tmp_path / "saved", llm=llm)
    assert set(loaded.ref_doc_info) == {"harrow", "bread"}
    assert [n.node.node_id for n in loaded.as_retriever(similarity_top_k=4).retrieve(QUESTION)] == before
    engine_a, engine_b = idx.as_query_engine(max_new_tokens=5), loaded.as_query_engine(max_new_tokens=5)
    assert engine_a.query(QUESTION).response == engine_b.query(QUESTION).response
    with pytest.raises(Exception, match="no sharedctx index"):
        SharedContextIndex.from_persist_dir(tmp_path / "nothing", llm=llm)


def test_bad_arguments(index, llm):
    with pytest.raises(TypeError, match="reads with a SharedLLM"):
        SharedContextIndex.from_documents(documents()[:1], llm="gpt")
    with pytest.raises(ValueError, match="mode"):
        index.as_query_engine(mode="vector")
    with pytest.raises(ValueError, match="similarity_top_k"):
        index.as_retriever(similarity_top_k=0)


def test_lexical_policy_ranks_the_document_that_shares_the_question_words(llm, tmp_path):
    idx = SharedContextIndex.from_documents(documents(), llm=llm, store=tmp_path / "lex", policy="lexical", top_k=1, encode="lazy")
    assert idx.context_index.policy == "lexical" and idx.context_index.encode == "lazy"
    assert all(r.chunks_encoded == 0 and r.chunks_deferred == r.chunks for r in idx.build_reports)
    nodes = idx.as_retriever(similarity_top_k=2).retrieve("night train to Oslo platform")
    assert {n.node.metadata["ref_doc_id"] for n in nodes} == {"trains"}  # BM25 on the text: no trained keys needed
    idx.persist(tmp_path / "lex-saved")
    loaded = SharedContextIndex.from_persist_dir(tmp_path / "lex-saved", llm=llm, policy="lexical", top_k=1)
    assert loaded.context_index.policy == "lexical"
    assert [n.node.node_id for n in loaded.as_retriever(similarity_top_k=2).retrieve("night train to Oslo platform")] == [n.node.node_id for n in nodes]
    with pytest.raises(ValueError, match="policy must be one of"):
        SharedContextIndex.from_documents(documents()[:1], llm=llm, policy="psychic")


def test_empty_documents_are_skipped_and_reported(llm, tmp_path):
    docs = documents()[:1] + [Document(text="", id_="blank"), Document(text=" \n\t", id_="spaces")] + documents()[1:2]
    idx = SharedContextIndex.from_documents(docs, llm=llm, store=tmp_path / "store")
    assert [doc_id for doc_id, _ in idx.skipped] == ["blank", "spaces"]
    assert all("empty" in reason for _, reason in idx.skipped)
    assert set(idx.ref_doc_info) == {"harrow", "bread"}
    assert {d.doc_id for d in idx.context_index.documents()} == {"harrow#sharedctx", "bread#sharedctx"}
    assert idx.docstore.get_document("blank#sharedctx", raise_error=False) is None
    assert idx.docstore.get_document_hash("blank") is None  # not recorded as ingested
    idx.insert(Document(text="", id_="later"))
    assert idx.skipped[-1][0] == "later" and set(idx.ref_doc_info) == {"harrow", "bread"}


def test_load_index_from_storage_names_from_persist_dir(llm, tmp_path):
    from llama_index.core import StorageContext, load_index_from_storage

    idx = SharedContextIndex.from_documents(documents()[:1], llm=llm, store=tmp_path / "live")
    idx.persist(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"SharedContextIndex\.from_persist_dir"):
        load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path / "saved")))
    assert set(SharedContextIndex.from_persist_dir(tmp_path / "saved", llm=llm).ref_doc_info) == {"harrow"}
    # the layout persist wrote before: LlamaIndex's stores in llama_index/, the struct typed as a plain list
    legacy = tmp_path / "saved" / "llama_index"
    legacy.mkdir()
    for f in (tmp_path / "saved").glob("*.json"):
        text = f.read_text()
        (legacy / f.name).write_text(text.replace('"__type__": "SharedContextIndex"', '"__type__": "list"'))
        f.unlink()
    assert '"list"' in (legacy / "index_store.json").read_text()
    reopened = SharedContextIndex.from_persist_dir(tmp_path / "saved", llm=llm)
    assert set(reopened.ref_doc_info) == {"harrow"} and reopened.index_struct.get_type() == "SharedContextIndex"
