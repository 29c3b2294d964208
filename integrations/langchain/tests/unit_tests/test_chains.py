"""End to end on a tiny model: retrieved context reaches ChatSharedLLM as injected states (never prompt text), and
the text composition puts it into the prompt of any chat model."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever

from conftest import contains
from langchain_sharedctx import ChatSharedLLM, SharedContextRetriever, create_latent_chain, create_text_chain
from sharedctx.testing import GenerationSpy as Spy

QUESTION = "What colour is the lantern of the Harrow Point light?"


def span_ids(llm, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_latent_chain_injects_the_retrieved_nodes(index, llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=8)
    retriever = SharedContextRetriever(index=index, k=4)
    chain = create_latent_chain(chat, retriever)
    with Spy(llm) as spy:
        out = chain.invoke(QUESTION)
    assert set(out) == {"question", "context", "answer"}
    (call,) = spy.calls
    injection = call["injection"]
    assert injection is not None and injection.n_states > 0
    # the model's prompt is the question in the chat template, and none of the retrieved spans
    question_ids = list(llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert call["prompt"] == question_ids
    for doc in out["context"]:
        if len(doc.page_content) >= 8 and doc.page_content not in QUESTION:
            assert not contains(call["prompt"], span_ids(llm, doc.page_content))
    # what was injected is what the index selected for the question: every retrieved Document is among the
    # injected nodes, whose states add up to the injection
    meta = out["answer"].response_metadata
    injected = {(c["doc_id"], c["chunk"], c["level"], c["index"]) for c in meta["citations"]}
    retrieved = {(d.metadata["doc_id"], d.metadata["chunk"], d.metadata["level"], d.metadata["index"]) for d in out["context"]}
    assert retrieved <= injected
    assert sum(c["n_states"] for c in meta["citations"]) == injection.n_states == meta["injected_states"]
    # and the answer is the index's own latent answer for that prompt
    expected = index.query(QUESTION, mode="latent", max_new_tokens=8, prompt=question_ids).text
    assert out["answer"].content == expected
    # the injected states matter: without them the model says something else
    assert out["answer"].content != chat.invoke(QUESTION).content


def test_chat_with_an_index_keeps_the_conversation(index, llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=6, context=index, mode="latent")
    messages = [SystemMessage("Answer in one word."), HumanMessage(QUESTION)]
    with Spy(llm) as spy:
        msg = chat.invoke(messages)
    assert spy.calls[0]["prompt"] == chat.prompt_ids(messages)  # the system turn is kept
    assert msg.response_metadata["injected_states"] > 0 and msg.response_metadata["citations"]
    streamed = list(chat.stream(messages))
    assert "".join(c.content for c in streamed) == msg.content
    assert streamed[-1].response_metadata["citations"] == msg.response_metadata["citations"]


class FixedRetriever(BaseRetriever):
    docs: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self.docs


def test_latent_chain_with_any_retriever_encodes_and_injects(llm, context_text):
    docs = [Document(page_content=context_text[:200]), Document(page_content=context_text[200:400])]
    chat = ChatSharedLLM(llm=llm, max_tokens=6)
    chain = create_latent_chain(chat, FixedRetriever(docs=docs))
    with Spy(llm) as spy:
        out = chain.invoke({"question": QUESTION})
    call = spy.calls[0]
    assert call["context"] is not None and call["context"].text == "\n\n".join(d.page_content for d in docs)
    assert not contains(call["prompt"], span_ids(llm, docs[0].page_content[:40]))
    assert out["answer"].response_metadata["injected_states"] > 0


def test_text_chain_puts_passages_into_any_chat_model(index):
    seen: list[Any] = []

    class Recording(FakeListChatModel):
        def _call(self, messages, stop=None, run_manager=None, **kwargs):
            seen.append(messages)
            return super()._call(messages, stop, run_manager, **kwargs)

    chain = create_text_chain(Recording(responses=["green"]), SharedContextRetriever(index=index, k=3))
    out = chain.invoke(QUESTION)
    assert out["answer"].content == "green"
    system = seen[0][0].content
    for i, doc in enumerate(out["context"], 1):
        assert f"[{i}] ({doc.metadata['doc_id']}) {doc.page_content.strip()}" in system


def test_latent_chain_streams(index, llm):
    chain = create_latent_chain(ChatSharedLLM(llm=llm, max_tokens=6), SharedContextRetriever(index=index, k=2))
    parts = list(chain.stream(QUESTION))
    answer = [p["answer"] for p in parts if "answer" in p]
    assert len(answer) >= 2  # token by token, then the final usage chunk
    assert "".join(a.content for a in answer) == chain.invoke(QUESTION)["answer"].content
