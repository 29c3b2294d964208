"""Behaviour of ChatSharedLLM on a tiny random model: the same tokens as sharedctx itself, contexts as injected
states (never prompt text), streaming and callbacks, async, stop sequences, usage and options."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from pydantic import ValidationError

from conftest import contains
from langchain_sharedctx import ChatSharedLLM


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class AsyncTokenRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def template_ids(llm, turns):
    ids = llm.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_invoke_matches_sharedctx_generate(llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=12)
    msg = chat.invoke("Where is the light?")
    assert isinstance(msg, AIMessage)
    ids = template_ids(llm, [{"role": "user", "content": "Where is the light?"}])
    assert msg.content == llm.generate(ids, max_new_tokens=12)
    assert msg.usage_metadata == {"input_tokens": len(ids), "output_tokens": 12, "total_tokens": len(ids) + 12}
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.response_metadata["injected_states"] == 0


def test_multi_turn_uses_the_base_chat_template(llm):
    chat = ChatSharedLLM(llm=llm)
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage("Colour?")]
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Colour?"},
    ]
    assert chat.prompt_ids(messages) == template_ids(llm, turns)


def test_context_is_injected_not_prompted(llm, context_text):
    chat = ChatSharedLLM(llm=llm, max_tokens=10)
    question = "What colour is the lantern?"
    seen: list[list[int]] = []
    original = llm.stream_completion

    def spy(prompt, **kw):
        seen.append(list(prompt))
        return original(prompt, **kw)

    llm.stream_completion = spy
    try:
        with_ctx = chat.invoke(question, context=context_text)
        without = chat.invoke(question)
    finally:
        del llm.stream_completion
    context_ids = llm.tokenizer(context_text[:60], add_special_tokens=False)["input_ids"]
    assert not contains(seen[0], context_ids)
    assert seen[0] == seen[1]  # the context adds nothing to the prompt
    meta = with_ctx.response_metadata
    assert meta["injected_states"] > 0 and meta["chunks"] >= 2 and meta["context_tokens"] > len(seen[0])
    assert with_ctx.usage_metadata["input_tokens"] == len(seen[0])
    assert with_ctx.content != without.content  # the injected states change what the model says
    tree = llm.encode(context_text)
    assert with_ctx.content == llm.generate(seen[0], context=tree, max_new_tokens=10)


def test_bound_field_and_call_contexts_agree(llm, context_text):
    question = "Who writes the logbook?"
    by_call = ChatSharedLLM(llm=llm, max_tokens=8).invoke(question, context=context_text)
    by_bind = ChatSharedLLM(llm=llm, max_tokens=8).bind(context=context_text).invoke(question)
    by_field = ChatSharedLLM(llm=llm, max_tokens=8, context=context_text).invoke(question)
    docs = [Document(page_content=context_text[:300]), Document(page_content=context_text[300:])]
    by_docs = ChatSharedLLM(llm=llm, max_tokens=8).invoke(question, context=docs)
    by_tree = ChatSharedLLM(llm=llm, max_tokens=8).invoke(question, context=llm.encode(context_text))
    assert by_call.content == by_bind.content == by_field.content == by_tree.content
    assert by_docs.response_metadata["injected_states"] > 0


def test_text_context_is_encoded_once(llm, context_text):
    chat = ChatSharedLLM(llm=llm, max_tokens=2, context=context_text)
    for q in ("one?", "two?", "three?"):
        chat.invoke(q)
    assert chat._contexts.encoded == 1
    chat.invoke("four?", context=context_text + " More.")
    assert chat._contexts.encoded == 2


def test_bad_context_type_is_refused(llm):
    with pytest.raises(TypeError, match="cannot use a int as context"):
        ChatSharedLLM(llm=llm).invoke("hi", context=42)


def test_stop_sequences_cut_the_answer(llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=16)
    full = chat.invoke("Tell me.").content
    stop = full[5:7]
    cut = full[: full.index(stop)]
    assert chat.invoke("Tell me.", stop=[stop]).content == cut
    assert ChatSharedLLM(llm=llm, max_tokens=16, stop=[stop]).invoke("Tell me.").content == cut
    streamed = "".join(c.content for c in chat.stream("Tell me.", stop=[stop]))
    assert streamed == cut


def test_stream_reports_tokens_and_usage(llm, context_text):
    chat = ChatSharedLLM(llm=llm, max_tokens=9)
    recorder = TokenRecorder()
    chunks = list(chat.stream("Go on.", context=context_text, config={"callbacks": [recorder]}))
    text = "".join(c.content for c in chunks)
    assert text == chat.invoke("Go on.", context=context_text).content
    assert [t for t in recorder.tokens if t] == [c.content for c in chunks if c.content]
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata["output_tokens"] == 9
    assert last.response_metadata["injected_states"] > 0
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.usage_metadata["output_tokens"] == 9 and merged.content == text


def test_streaming_flag_routes_invoke_through_stream(llm):
    recorder = TokenRecorder()
    chat = ChatSharedLLM(llm=llm, max_tokens=5, streaming=True)
    msg = chat.invoke("x", config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == msg.content and recorder.tokens


async def test_async_variants_match_sync(llm, context_text):
    chat = ChatSharedLLM(llm=llm, max_tokens=8)
    expected = chat.invoke("Async?", context=context_text).content
    assert (await chat.ainvoke("Async?", context=context_text)).content == expected
    recorder = AsyncTokenRecorder()
    chunks = [c async for c in chat.astream("Async?", context=context_text, config={"callbacks": [recorder]})]
    assert "".join(c.content for c in chunks) == expected
    assert "".join(recorder.tokens) == expected
    assert chunks[-1].usage_metadata["output_tokens"] == 8
    # two concurrent calls inside one running loop (nothing calls asyncio.run)
    a, b = await asyncio.gather(chat.ainvoke("Async?", context=context_text), chat.ainvoke("Other?"))
    assert a.content == expected and b.content == chat.invoke("Other?").content


async def test_astream_errors_surface(llm):
    chat = ChatSharedLLM(llm=llm)
    with pytest.raises(TypeError, match="unknown call options"):
        async for _ in chat.astream("x", bogus=1):
            pass


def test_batch_equals_sequential(llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=6)
    prompts = ["a?", "b?", "c?", "d?"]
    assert [m.content for m in chat.batch(prompts)] == [chat.invoke(p).content for p in prompts]


def test_sampling_is_seeded(llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=10, temperature=1.0, top_k=50, seed=3)
    first = chat.invoke("Sample.").content
    assert chat.invoke("Sample.").content == first
    assert chat.invoke("Sample.", seed=4).content != first or chat.invoke("Sample.", seed=5).content != first


def test_options_are_validated(llm):
    chat = ChatSharedLLM(llm=llm)
    with pytest.raises(TypeError, match="unknown call options"):
        chat.invoke("x", max_length=3)
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke("x", model="another/model")
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "http://x"}}])])
    with pytest.raises(ValidationError):
        ChatSharedLLM(llm=llm, temprature=0.5)
    with pytest.raises(ValidationError):
        ChatSharedLLM(llm=llm, max_tokens=0)
    ChatSharedLLM(llm=llm, api_key="unused", timeout=5, max_retries=1)  # hosted-model options are accepted


def test_identifying_and_ls_params(llm):
    chat = ChatSharedLLM(llm=llm, max_tokens=4, stop=["\n"])
    params = chat._identifying_params
    assert params["fingerprint"] == llm.fingerprint and params["config"]["chunk_size"] == llm.config.chunk_size
    ls = chat._get_ls_params()
    assert ls["ls_provider"] == "sharedctx" and ls["ls_max_tokens"] == 4 and ls["ls_stop"] == ["\n"]
    assert chat._llm_type == "sharedctx-chat"


def test_models_load_lazily_and_are_shared(monkeypatch, llm):
    calls = []

    def fake_from_pretrained(base=None, **kw):
        calls.append((base, kw))
        return llm

    import sharedctx

    monkeypatch.setattr(sharedctx.SharedLLM, "from_pretrained", staticmethod(fake_from_pretrained))
    import sharedctx.base_model

    monkeypatch.setattr(sharedctx.base_model, "_LOADED", type(sharedctx.base_model._LOADED)())  # SharedLLM.shared's cache
    a = ChatSharedLLM(model="tiny/base", max_tokens=2)
    b = ChatSharedLLM(model="tiny/base", max_tokens=3)
    assert calls == [] and a.llm is None  # nothing loads at construction
    a.invoke("x")
    b.invoke("y")
    assert len(calls) == 1 and a.get_llm() is b.get_llm() is llm
    assert calls[0][0] == "tiny/base"
    assert a._get_ls_params()["ls_model_name"] == "tiny/base"
