"""The default model (SmolLM2-135M-Instruct) through LlamaIndex: the README quickstart's path, with its defaults
(the lexical walk, hybrid answers) answering from the documents."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_default_model_llm_and_query_engine(tmp_path):
    from llama_index.core import Document

    from llama_index.indices.sharedctx import SharedContextIndex
    from llama_index.llms.sharedctx import SharedLLM
    from sharedctx.config import DEFAULT_POLICY

    llm = SharedLLM(max_new_tokens=24)
    assert "Paris" in llm.complete("What is the capital of France?").text

    notes = "The Harrow Point light is kept by Ada Lindqvist. She writes the logbook every night. The lantern burns green. "
    docs = [
        Document(text=notes * 20, id_="harrow"),
        Document(text="Bread needs flour, water, salt and yeast; knead it for ten minutes. " * 20, id_="bread"),
    ]
    index = SharedContextIndex.from_documents(docs, llm=llm, store=tmp_path / "index")
    assert index.context_index.policy == DEFAULT_POLICY
    hits = index.as_retriever(similarity_top_k=3).retrieve("What colour is the lantern?")
    assert "green" in hits[0].node.text  # the lexical walk finds the span; the adapter's `right` walk did not
    response = index.as_query_engine().query("Who keeps the Harrow Point light?")  # hybrid, the LLM's 24 tokens
    assert "Ada" in response.response and response.metadata["stats"]["injected_states"] > 0
    assert response.metadata["stats"]["generated_tokens"] <= 24
    latent = index.as_query_engine(mode="latent").query("Who keeps the Harrow Point light?")
    assert latent.metadata["stats"]["prompt_tokens"] < 40  # the question only: the documents were injected
    index.persist(tmp_path / "saved")
    again = SharedContextIndex.from_persist_dir(tmp_path / "saved", llm=llm)
    assert set(again.ref_doc_info) == {"harrow", "bread"}
