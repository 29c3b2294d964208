"""Defaults that answer (the lexical walk, hybrid reading of an index), each mode of reading an index through
ChatSharedLLM and the chains, token counting with the model's own tokenizer, and inputs that are not text."""

from __future__ import annotations

import time
import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from pydantic import ValidationError

from conftest import DOCS
from langchain_sharedctx import ChatSharedLLM, SharedContextRetriever, create_hybrid_chain, create_latent_chain
from sharedctx.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, DEFAULT_POLICY
from sharedctx.testing import GenerationSpy as Spy

QUESTION = "What colour is the lantern of the Harrow Point light?"


def test_defaults(index, llm):
    assert DEFAULT_POLICY == "lexical" and DEFAULT_MODE == "hybrid"
    assert index.policy == DEFAULT_POLICY  # a ContextIndex built without naming one
    chat = ChatSharedLLM(llm=llm)
    assert chat.mode == DEFAULT_MODE and chat.max_tokens == DEFAULT_MAX_NEW_TOKENS
    assert ChatSharedLLM.model_fields["mode"].default == DEFAULT_MODE


@pytest.mark.parametrize("mode", ["latent", "text", "hybrid"])
def test_an_index_context_gives_the_index_answer(index, llm, mode):
    msg = ChatSharedLLM(llm=llm, max_tokens=6, context=index, mode=mode).invoke(QUESTION)
    answer = index.query(QUESTION, mode=mode, max_new_tokens=6)
    assert msg.content == answer.text
    meta = msg.response_metadata
    assert meta["mode"] == mode and meta["injected_states"] == answer.stats.injected_states
    assert [(c["doc_id"], c["chunk"], c["level"], c["index"]) for c in meta["citations"]] == [(c.doc_id, c.chunk, c.level, c.index) for c in answer.citations]
    assert msg.content == ChatSharedLLM(llm=llm, max_tokens=6).invoke(QUESTION, context=index, mode=mode).content  # per call


def test_hybrid_reads_a_conversation_with_passages_and_states(index, llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=4, context=index)  # hybrid by default
    messages = [SystemMessage("Answer in one word."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage(QUESTION)]
    with Spy(llm) as spy:
        msg = chat.invoke(messages)
    prompt = spy.text()
    # the turns before the question stay in front; the passages and the question are the last user turn
    assert prompt.index("Answer in one word.") < prompt.index("Hello.") < prompt.index("[1]") < prompt.index("Question: " + QUESTION)
    assert spy.calls[0]["injection"] is not None and spy.calls[0]["injection"].n_states == msg.response_metadata["injected_states"] > 0
    best = max(msg.response_metadata["citations"], key=lambda c: c["score"])
    assert best["text"].strip() in prompt
    with Spy(llm) as spy:
        text = chat.invoke(messages, mode="text")
    assert spy.calls[0]["injection"] is None and "[1]" in spy.text() and text.response_metadata["citations"]
    with pytest.raises(ValueError, match="mode must be one of"):
        chat.invoke(messages, mode="vector")
    with pytest.raises(ValidationError):
        ChatSharedLLM(llm=llm, mode="vector")


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_a_system_prompt_gives_the_index_answer_with_that_system_prompt(index, llm, mode):
    """The passages go into the last user turn, the turns before stay: with a system turn, the index's own answer
    for that system prompt (`ContextIndex.query(..., system=...)`)."""
    system = "Answer in one word."
    msg = ChatSharedLLM(llm=llm, max_tokens=6, context=index, mode=mode).invoke([SystemMessage(system), HumanMessage(QUESTION)])
    answer = index.query(QUESTION, mode=mode, system=system, max_new_tokens=6)
    assert msg.content == answer.text and msg.response_metadata["injected_states"] == answer.stats.injected_states
    assert msg.usage_metadata["input_tokens"] == answer.stats.prompt_tokens


def test_hybrid_chain_is_the_index_hybrid_answer(index, llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=6, mode="latent")  # the chain says how it reads, whatever the chat's mode
    out = create_hybrid_chain(chat, SharedContextRetriever(index=index, k=4)).invoke(QUESTION)
    assert out["answer"].content == index.query(QUESTION, mode="hybrid", max_new_tokens=6).text
    assert out["answer"].response_metadata["mode"] == "hybrid"
    latent = create_latent_chain(ChatSharedLLM(llm=llm, max_tokens=6), SharedContextRetriever(index=index, k=4)).invoke(QUESTION)
    assert latent["answer"].content == index.query(QUESTION, mode="latent", max_new_tokens=6).text


class FixedRetriever(BaseRetriever):
    docs: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self.docs


def test_hybrid_chain_with_any_retriever_prompts_and_injects(llm):
    docs = [Document(page_content=DOCS["harrow"][:120], metadata={"doc_id": "harrow"})]
    chain = create_hybrid_chain(ChatSharedLLM(llm=llm, max_tokens=4), FixedRetriever(docs=docs))
    with Spy(llm) as spy:
        out = chain.invoke(QUESTION)
    assert "[1] (harrow) " + DOCS["harrow"][:120].strip() in spy.text() and QUESTION in spy.text()
    assert spy.calls[0]["context"] is not None and out["answer"].response_metadata["injected_states"] > 0


# ---------------------------------------------------------------------- tokens
def test_token_counts_use_the_model_tokenizer_offline(monkeypatch, llm):
    import langchain_core.language_models.base as base

    def no_gpt2(text: str) -> list[int]:
        raise AssertionError("the GPT-2 fallback (a download) was used")

    monkeypatch.setattr(base, "_get_token_ids_default_method", no_gpt2)
    chat = ChatSharedLLM(llm=llm, max_tokens=3)
    text = "The lantern burns green."
    t0 = time.perf_counter()
    ids = chat.get_token_ids(text)
    n = chat.get_num_tokens(text)
    elapsed = time.perf_counter() - t0
    assert ids == llm.tokenizer(text, add_special_tokens=False)["input_ids"] and n == len(ids) > 0
    assert elapsed < 1.0  # milliseconds (the fallback retried a download for minutes)
    messages = [SystemMessage("Be brief."), HumanMessage(text)]
    assert chat.get_num_tokens_from_messages(messages) == chat.invoke(messages).usage_metadata["input_tokens"]
    custom = ChatSharedLLM(llm=llm, custom_get_token_ids=lambda t: [1, 2])
    assert custom.get_num_tokens("anything") == 2


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize(("bad", "name"), [(None, "NoneType"), (42, "int")])
def test_a_query_that_is_not_text_is_refused(index, bad, name):
    retriever = SharedContextRetriever(index=index)
    with pytest.raises(TypeError, match=f"query must be a string, got {name}"):
        retriever.invoke(bad)


def test_both_integrations_share_one_loader():
    """Neither package loads models itself: both go through sharedctx.contexts.holder_llm / load_llm."""
    import ast
    from pathlib import Path

    import langchain_sharedctx

    for path in Path(langchain_sharedctx.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("shared", "from_pretrained")]
        defs = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and "load" in n.name]
        assert not calls and not defs, (path.name, defs)
