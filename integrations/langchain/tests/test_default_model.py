"""The default model (SmolLM2-135M-Instruct) through LangChain: the README quickstart's path, with its defaults
(the lexical walk, hybrid answers) answering from the documents."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def test_default_model_chat_and_chains(tmp_path):
    from sharedctx.config import DEFAULT_POLICY
    from sharedctx.index import ContextIndex

    from langchain_sharedctx import ChatSharedLLM, SharedContextRetriever, create_hybrid_chain, create_latent_chain

    chat = ChatSharedLLM(max_tokens=24)
    assert "Paris" in chat.invoke("What is the capital of France?").content
    t0 = time.perf_counter()
    assert chat.get_num_tokens("The lantern burns green.") == len(chat.get_llm().tokenizer("The lantern burns green.")["input_ids"])
    assert time.perf_counter() - t0 < 0.5

    llm = chat.get_llm()
    index = ContextIndex(llm, store=tmp_path / "index")
    assert index.policy == DEFAULT_POLICY
    notes = "The Harrow Point light is kept by Ada Lindqvist. She writes the logbook every night. The lantern burns green. "
    index.add_text(notes * 20, doc_id="harrow")
    index.add_text("Bread needs flour, water, salt and yeast; knead it for ten minutes. " * 20, doc_id="bread")
    retriever = SharedContextRetriever(index=index, k=3)
    out = create_hybrid_chain(chat, retriever).invoke("Who keeps the Harrow Point light?")
    assert "Ada" in out["answer"].content and out["answer"].response_metadata["injected_states"] > 0
    assert out["context"][0].metadata["doc_id"] == "harrow"
    assert "Ada" in chat.invoke("Who keeps the Harrow Point light?", context=index).content  # hybrid by default
    latent = create_latent_chain(chat, retriever).invoke("Who keeps the Harrow Point light?")
    assert latent["answer"].usage_metadata["input_tokens"] < 40  # the question only: the documents were injected
