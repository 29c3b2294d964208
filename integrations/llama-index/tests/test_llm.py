"""llama_index.llms.sharedctx.SharedLLM on a tiny model: the same tokens as sharedctx, the base model's chat template,
contexts as injected states, streaming, callbacks and TokenCountingHandler, Settings.llm, async in a running loop."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage

from conftest import DOCS, Spy, contains
from llama_index.llms.sharedctx import SharedLLM

CONTEXT = DOCS["harrow"]


def template_ids(llm, turns):
    ids = llm.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_complete_matches_sharedctx(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=10)
    r = lm.complete("Where is the light?")
    ids = template_ids(llm, [{"role": "user", "content": "Where is the light?"}])
    assert r.text == llm.generate(ids, max_new_tokens=10)
    assert r.raw["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10}
    assert r.additional_kwargs["finish_reason"] == "length" and r.additional_kwargs["injected_states"] == 0


def test_metadata(llm):
    meta = SharedLLM(llm=llm, max_new_tokens=7).metadata
    assert meta.context_window == llm.max_positions and meta.num_output == 7 and meta.is_chat_model
    assert SharedLLM(llm=llm, context_window=300).metadata.context_window == 300


def test_chat_uses_the_base_template_over_all_turns(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=6)
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Colour?")]
    turns = [{"role": m.role.value, "content": m.content} for m in messages]
    assert lm.prompt_ids(messages) == template_ids(llm, turns)
    r = lm.chat(messages)
    assert r.message.role.value == "assistant"
    assert r.message.content == llm.generate(template_ids(llm, turns), max_new_tokens=6)
    # system_prompt joins a conversation without a system turn
    with_system = SharedLLM(llm=llm, system_prompt="Be brief.")
    assert with_system.prompt_ids(with_system._with_system(messages[1:])) == template_ids(llm, turns)


def test_context_is_injected_not_prompted(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=8)
    with Spy(llm) as spy:
        with_ctx = lm.complete("What colour is the lantern?", context=CONTEXT)
        without = lm.complete("What colour is the lantern?")
    assert spy.calls[0]["prompt"] == spy.calls[1]["prompt"]
    assert not contains(spy.calls[0]["prompt"], llm.tokenizer(CONTEXT[:50], add_special_tokens=False)["input_ids"])
    assert with_ctx.additional_kwargs["injected_states"] > 0 and with_ctx.text != without.text
    bound = SharedLLM(llm=llm, max_new_tokens=8, context=CONTEXT)
    assert bound.complete("What colour is the lantern?").text == with_ctx.text
    assert bound._contexts.encoded == 1
    from llama_index.core.schema import TextNode

    nodes = [TextNode(text=CONTEXT[:100]), TextNode(text=CONTEXT[100:])]
    assert lm.complete("x", context=nodes).additional_kwargs["injected_states"] > 0


def test_stream_complete_and_stream_chat(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=9)
    full = lm.complete("Go on.", context=CONTEXT)
    parts = list(lm.stream_complete("Go on.", context=CONTEXT))
    assert "".join(p.delta for p in parts) == parts[-1].text == full.text
    assert parts[-1].raw["usage"] == full.raw["usage"]
    chat_parts = list(lm.stream_chat([ChatMessage(role="user", content="Go on.")], context=CONTEXT))
    assert chat_parts[-1].message.content == full.text


def test_token_counting_handler_gets_exact_counts(llm):
    counter = TokenCountingHandler(tokenizer=lambda text: [0])  # would count 1 per string: exact counts must win
    lm = SharedLLM(llm=llm, max_new_tokens=5, callback_manager=CallbackManager([counter]))
    r = lm.complete("Count me.")
    lm.chat([ChatMessage(role="user", content="Count me.")])
    list(lm.stream_complete("Count me."))
    usage = r.raw["usage"]
    assert counter.prompt_llm_token_count == 3 * usage["prompt_tokens"]
    assert counter.completion_llm_token_count == 3 * usage["completion_tokens"]


def test_settings_llm(llm):
    previous = Settings._llm
    try:
        Settings.llm = SharedLLM(llm=llm, max_new_tokens=4)
        assert isinstance(Settings.llm, SharedLLM)
        assert Settings.llm.complete("hi").text == SharedLLM(llm=llm, max_new_tokens=4).complete("hi").text
    finally:
        Settings._llm = previous


async def test_async_inside_a_running_loop(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=6)
    expected = lm.complete("Async?").text
    assert (await lm.acomplete("Async?")).text == expected
    gen = await lm.astream_complete("Async?")
    parts = [p async for p in gen]
    assert parts[-1].text == expected
    chat = await lm.achat([ChatMessage(role="user", content="Async?")])
    assert chat.message.content == expected
    gen = await lm.astream_chat([ChatMessage(role="user", content="Async?")])
    assert [p async for p in gen][-1].message.content == expected
    a, b = await asyncio.gather(lm.acomplete("Async?"), lm.acomplete("Other?"))
    assert a.text == expected and b.text == lm.complete("Other?").text


def test_options_are_validated(llm):
    lm = SharedLLM(llm=llm)
    with pytest.raises(TypeError, match="unknown options"):
        lm.complete("x", max_tokens=3)
    with pytest.raises(TypeError, match="cannot use a int as context"):
        lm.complete("x", context=3)
    stop_text = SharedLLM(llm=llm, max_new_tokens=16).complete("Tell me.").text
    stop = stop_text[4:6]
    assert SharedLLM(llm=llm, max_new_tokens=16, stop=[stop]).complete("Tell me.").text == stop_text[: stop_text.index(stop)]


async def test_async_calls_are_reported_once_with_exact_counts(llm):
    """acomplete / achat / astream_* each fire one LLM event (not also the sync method's): counts are not doubled."""
    counter = TokenCountingHandler(tokenizer=lambda text: [0])
    lm = SharedLLM(llm=llm, max_new_tokens=5, callback_manager=CallbackManager([counter]))
    usage = (await lm.acomplete("Count me.")).raw["usage"]
    await lm.achat([ChatMessage(role="user", content="Count me.")])
    assert [p async for p in await lm.astream_complete("Count me.")][-1].raw["usage"] == usage
    assert [p async for p in await lm.astream_chat([ChatMessage(role="user", content="Count me.")])][-1].raw["usage"] == usage
    assert len(counter.llm_token_counts) == 4
    assert counter.prompt_llm_token_count == 4 * usage["prompt_tokens"]
    assert counter.completion_llm_token_count == 4 * usage["completion_tokens"]
