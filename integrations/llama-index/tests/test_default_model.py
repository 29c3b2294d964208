"""The default model (SmolLM2-135M-Instruct) through LlamaIndex: the README quickstart's path."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_default_model_llm_and_query_engine(tmp_path):
    from llama_index.core import Document

    from llama_index.indices.sharedctx import SharedContextIndex
    from llama_index.llms.sharedctx import SharedLLM

    llm = SharedLLM(max_new_tokens=16)
    assert "Paris" in llm.complete("What is the capital of France?").text

    docs = [
        Document(text="The Harrow Point light is kept by Ada Lindqvist. Its lantern burns green.", id_="harrow"),
        Document(text="Bread needs flour, water, salt and yeast.", id_="bread"),
    ]
    index = SharedContextIndex.from_documents(docs, llm=llm, store=tmp_path / "index")
    response = index.as_query_engine(max_new_tokens=24).query("Who keeps the Harrow Point light?")
    stats = response.metadata["stats"]
    assert stats["injected_states"] > 0 and response.source_nodes
    assert stats["prompt_tokens"] < 40  # the question only: the documents were injected
    index.persist(tmp_path / "saved")
    again = SharedContextIndex.from_persist_dir(tmp_path / "saved", llm=llm)
    assert set(again.ref_doc_info) == {"harrow", "bread"}
