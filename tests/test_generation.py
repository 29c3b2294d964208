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

    row = RowDecoder(SamplingOptions(max_new_tokens=10, stop_on_repeat=0), {2}, tok, None)
    assert row.push(logits_for(ids[0])) == "a" and not row.done and row.first_token_at is not None
    assert row.push(logits_for(2)) == "" and row.done and row.generated == [ids[0]]  # end of sequence: not kept
    assert row.finish() == ""

    row = RowDecoder(SamplingOptions(max_new_tokens=10, stop=["END"], stop_on_repeat=0), {2}, tok, None)
    released = "".join(row.push(logits_for(t)) for t in ids[:3])  # "abE": "E" may begin the stop string
    assert released == "ab" and not row.done
    assert row.push(logits_for(ids[3])) == "" and not row.done  # "EN" held back too
    assert row.push(logits_for(ids[4])) == "" and row.done and row.finish() == ""  # stopped: "END" never released

    row = RowDecoder(SamplingOptions(max_new_tokens=2, stop=["zz"], stop_on_repeat=0), {2}, tok, None)
    row.push(logits_for(ids[0]))
    assert row.push(logits_for(ids[1])) == "b" and row.done and row.generated == ids[:2]  # max_new_tokens
    assert RowDecoder(SamplingOptions(max_new_tokens=0, stop_on_repeat=0), {2}, tok, None).done
    untokenized = RowDecoder(SamplingOptions(max_new_tokens=3, stop=["a"], stop_on_repeat=0), {2}, None, None)
    assert untokenized.push(logits_for(ids[0])) == "" and not untokenized.done and untokenized.finish() == ""


# ---------------------------------------------------------------------- repetition guards
def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_stop_on_repeat_ends_a_looping_answer_and_drops_the_repeat():
    llm = make_llm(gates=1.0)  # this tiny random model loops under greedy decoding (e.g. 196 74 16 196 74 16 ...)
    kw = dict(context="some context text " * 5, max_new_tokens=60)
    loose = llm.complete("hello", stop_on_repeat=0, **kw)
    assert len(_ngrams(loose.token_ids, 4)) > len(set(_ngrams(loose.token_ids, 4)))  # the unguarded answer repeats
    guarded = llm.complete("hello", stop_on_repeat=4, **kw)
    kept = guarded.token_ids
    assert 0 < len(kept) < len(loose.token_ids) and loose.token_ids[: len(kept)] == kept  # the same answer, cut short
    assert len(_ngrams(kept, 4)) == len(set(_ngrams(kept, 4)))  # what is kept never repeats a 4-gram
    # it ended exactly where the unguarded answer first repeated a 4-gram: the repeat itself is dropped
    dropped = tuple(loose.token_ids[len(kept) : len(kept) + 4])
    assert dropped in _ngrams(loose.token_ids[: len(kept) + 3], 4)  # it had begun earlier (overlapping at most)
    assert guarded.text == llm.tokenizer.decode(kept, skip_special_tokens=True)
    assert "".join(llm.stream("hello", stop_on_repeat=4, **kw)) == guarded.text  # nothing dropped was streamed


def test_no_repeat_ngram_size_bans_repeated_ngrams():
    llm = make_llm(gates=1.0)
    kw = dict(context="some context text " * 5, max_new_tokens=60)
    ids = llm.complete("abc", no_repeat_ngram_size=3, **kw).token_ids
    assert len(ids) > 10 and len(_ngrams(ids, 3)) == len(set(_ngrams(ids, 3)))
    assert llm.complete("abc", **kw).token_ids != ids


def test_repetition_guard_is_on_by_default_as_in_the_cli_and_equal_in_batch():
    from sharedctx.config import DEFAULT_STOP_ON_REPEAT

    llm = make_llm(gates=1.0)
    context = llm.encode(random_ids(90, seed=1))
    prompts = ["hello", "tell me", "abc"]
    default = [llm.complete(p, context=context, max_new_tokens=40).token_ids for p in prompts]
    guarded = [llm.complete(p, context=context, max_new_tokens=40, stop_on_repeat=DEFAULT_STOP_ON_REPEAT).token_ids for p in prompts]
    off = [llm.complete(p, context=context, max_new_tokens=40, stop_on_repeat=0, no_repeat_ngram_size=0).token_ids for p in prompts]
    assert DEFAULT_STOP_ON_REPEAT == 8 and SamplingOptions().stop_on_repeat == DEFAULT_STOP_ON_REPEAT
    assert default == guarded and default != off  # this tiny model loops: the default guard cuts a loop off
    assert all(len(d) <= len(o) and o[: len(d)] == d for d, o in zip(default, off))  # it only ever shortens the answer
    injections = [llm.prepare_injection(context, llm.prompt_ids(p)) for p in prompts]
    for opts in ({"stop_on_repeat": 4}, {"no_repeat_ngram_size": 3}):
        single = [llm.complete(p, context=context, max_new_tokens=40, **opts) for p in prompts]
        batch = llm.complete_batch(prompts, injections=injections, options={"max_new_tokens": 40, **opts})
        assert [c.token_ids for c in batch] == [c.token_ids for c in single]
        assert [c.text for c in batch] == [c.text for c in single]


def test_row_decoder_repeat_guards_with_rigged_logits():
    from conftest import byte_tokenizer
    from sharedctx.generation import RowDecoder, banned_tokens

    tok = byte_tokenizer()
    ids = tok("xabab", add_special_tokens=False)["input_ids"]

    def logits_for(tid: int) -> torch.Tensor:
        out = torch.full((1, 300), -1e9)
        out[0, tid] = 0.0
        return out

    row = RowDecoder(SamplingOptions(max_new_tokens=20, stop_on_repeat=2), {2}, tok, None)
    released = "".join(row.push(logits_for(t)) for t in ids[:4])  # "xaba": the last token's text is held back
    assert released == "xab" and not row.done
    assert row.push(logits_for(ids[4])) == "" and row.done and row.repeated  # "ab" again: stop, drop it
    assert row.generated == ids[:3] and row.finish() == ""  # "xab" was released already; nothing more
    assert banned_tokens([1, 2, 3, 1, 2], 3) == [3] and banned_tokens([1, 2], 3) == [] and banned_tokens([5, 5], 2) == [5]
    row = RowDecoder(SamplingOptions(max_new_tokens=20, no_repeat_ngram_size=2, stop_on_repeat=0), {2}, tok, None)
    rigged = torch.full((1, 300), -1e9)
    rigged[0, ids[1]], rigged[0, ids[2]] = 1.0, 0.5  # "a" always preferred, "b" second
    assert "".join(row.push(rigged) for _ in range(3)) == "aab"  # "aa" may not come twice: "b" instead
    for name in ("stop_on_repeat", "no_repeat_ngram_size"):
        for bad in (-1, 1):
            with pytest.raises(ValueError, match=name):
                SamplingOptions(**{name: bad})


def test_the_cli_guards_against_repetition_by_default():
    from sharedctx.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ask", "q", "--file", "x"]).stop_on_repeat == 8
    assert parser.parse_args(["ask", "q", "--file", "x", "--stop-on-repeat", "0"]).stop_on_repeat == 0
