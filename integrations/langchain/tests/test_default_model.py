"""The default model (SmolLM2-135M-Instruct) through LangChain: the README quickstart's path."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_default_model_chat_and_latent_chain(tmp_path):
    from sharedctx.index import ContextIndex

    from langchain_sharedctx import ChatSharedLLM, SharedContextRetriever, create_latent_chain

    chat = ChatSharedLLM(max_tokens=16)
    assert "Paris" in chat.invoke("What is the capital of France?").content

    llm = chat.get_llm()
    index = ContextIndex(llm, store=tmp_path / "index")
    index.add_text("The Harrow Point light is kept by Ada Lindqvist. Its lantern burns green.", doc_id="harrow")
    index.add_text("Bread needs flour, water, salt and yeast.", doc_id="bread")
    chain = create_latent_chain(chat, SharedContextRetriever(index=index, k=2))
    out = chain.invoke("Who keeps the Harrow Point light?")
    meta = out["answer"].response_metadata
    assert meta["injected_states"] > 0 and meta["citations"]
    assert out["answer"].usage_metadata["input_tokens"] < 40  # the question only: the documents were injected
    assert out["context"] and out["context"][0].metadata["doc_id"] in {"harrow", "bread"}
