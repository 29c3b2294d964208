"""Generation: greedy equals the argmax of a full forward, sampling is seeded, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llm, random_ids
from sharedctx.generation import SamplingOptions, StopMatcher


def test_greedy_generation_matches_full_forward_argmax():
    llm = make_llm(gates=1.0)
    context = llm.encode(random_ids(90, seed=1))
    prompt = random_ids(8, seed=2).tolist()
    completion = llm.complete(prompt, context=context, max_new_tokens=10)
    tokens = completion.token_ids
    assert 0 < len(tokens) <= 10
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = llm(full, context=context, query_length=len(prompt)).logits[0]
    for i, tid in enumerate(tokens):
        assert int(logits[len(prompt) - 1 + i].argmax()) == tid
    assert completion.stats["injected_states"] > 0 and completion.stats["chunks"] == 3
    assert completion.timings["total_s"] >= completion.timings["prefill_s"]


def test_sampling_is_reproducible_with_a_seed():
    llm = make_llm(gates=1.0)
    kw = dict(context=random_ids(50), max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    a = llm.complete("hello", seed=7, **kw).token_ids
    b = llm.complete("hello", seed=7, **kw).token_ids
    c = llm.complete("hello", seed=8, **kw).token_ids
    assert a == b and a != c


def test_stream_concatenates_to_generate():
    llm = make_llm(gates=1.0)
    pieces = list(llm.stream("tell me", context="some context text " * 5, max_new_tokens=15))
    assert "".join(pieces) == llm.generate("tell me", context="some context text " * 5, max_new_tokens=15)


def test_stop_strings_cut_the_answer():
    llm = make_llm(gates=1.0)
    full = llm.generate("abc", max_new_tokens=20)
    assert len(full) >= 4
    stop = full[2:4]
    cut = llm.generate("abc", max_new_tokens=20, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert stop not in "".join(llm.stream("abc", max_new_tokens=20, stop=[stop]))


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.feed("hello EN") == ""
    assert m.feed("hello ENX") == "ENX"
    assert m.feed("hello ENX END more") == " " and m.stopped


def test_generation_options_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    llm = make_llm()
    with pytest.raises(ValueError, match="empty"):
        llm.generate([])
    assert llm.complete("hi", max_new_tokens=0).token_ids == []


def test_chat_prompt_ids_use_the_template_for_whole_conversations():
    llm = make_llm()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = llm.chat_prompt_ids(messages)
    text = llm.tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # a single question through generate() uses the same template
    assert llm.prompt_ids("hi", system="Be brief.")[0].tolist() == ids
    llm.tokenizer.chat_template = None
    assert llm.tokenizer.decode(llm.chat_prompt_ids(messages)).endswith("System: Be brief.\nUser: hi\nAssistant:")


def test_iterate_in_thread_yields_items_and_reraises():
    import asyncio

    from sharedctx.concurrency import iterate_in_thread

    def items():
        yield from ("a", "b", "c")

    def broken():
        yield "x"
        raise RuntimeError("boom")

    async def collect(make):
        return [item async for item in iterate_in_thread(make)]

    assert asyncio.run(collect(items)) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect(broken))
    llm = make_llm(gates=1.0)
    streamed = asyncio.run(collect(lambda: llm.stream("hi", context="text " * 20, max_new_tokens=6)))
    assert "".join(streamed) == llm.generate("hi", context="text " * 20, max_new_tokens=6)


def test_row_decoder_ends_at_eos_max_tokens_and_stop_strings():
    from conftest import byte_tokenizer
    from sharedctx.generation import RowDecoder

    tok = byte_tokenizer()
    ids = tok("abEND", add_special_tokens=False)["input_ids"]

    def logits_for(tid: int) -> torch.Tensor:
        out = torch.full((1, 300), -1e9)
        out[0, tid] = 0.0
        return out

    row = RowDecoder(SamplingOptions(max_new_tokens=10), {2}, tok, None)
    assert row.push(logits_for(ids[0])) == "a" and not row.done and row.first_token_at is not None
    assert row.push(logits_for(2)) == "" and row.done and row.generated == [ids[0]]  # end of sequence: not kept
    assert row.finish() == ""

    row = RowDecoder(SamplingOptions(max_new_tokens=10, stop=["END"]), {2}, tok, None)
    released = "".join(row.push(logits_for(t)) for t in ids[:3])  # "abE": "E" may begin the stop string
    assert released == "ab" and not row.done
    assert row.push(logits_for(ids[3])) == "" and not row.done  # "EN" held back too
    assert row.push(logits_for(ids[4])) == "" and row.done and row.finish() == ""  # stopped: "END" never released

    row = RowDecoder(SamplingOptions(max_new_tokens=2, stop=["zz"]), {2}, tok, None)
    row.push(logits_for(ids[0]))
    assert row.push(logits_for(ids[1])) == "b" and row.done and row.generated == ids[:2]  # max_new_tokens
    assert RowDecoder(SamplingOptions(max_new_tokens=0), {2}, tok, None).done
    untokenized = RowDecoder(SamplingOptions(max_new_tokens=3, stop=["a"]), {2}, None, None)
    assert untokenized.push(logits_for(ids[0])) == "" and not untokenized.done and untokenized.finish() == ""
