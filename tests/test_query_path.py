"""One query path: a question's options are checked, its prompt tokenised and its length checked once, into one
prepared request that the same decoding loop answers alone, in a batch or streamed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_llm
from sharedctx import generation
from sharedctx.index import ContextIndex
from test_index import CFG, QUESTIONS, answer_key, document

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return make_llm(gates=1.0, **CFG)


@pytest.fixture(scope="module")
def built(llm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ix")
    index = ContextIndex(llm, directory)
    for i in range(2):
        index.add_text(document(i, paragraphs=12), doc_id=f"doc{i}")
    index.close()
    return directory


class CountingTokenizer:
    """The model's tokenizer, counting the tokenisations of texts that hold ``needle`` (the question)."""

    def __init__(self, inner, needle: str) -> None:
        self.inner, self.needle, self.count = inner, needle, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, *args, **kwargs):
        self.count += self.needle in str(text)
        return self.inner(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self.count += any(self.needle in m["content"] for m in messages)
        return self.inner.apply_chat_template(messages, *args, **kwargs)


@pytest.mark.parametrize("batched", [False, True])
def test_unknown_and_bad_options_are_refused_on_every_path(llm, built, batched):
    index = ContextIndex.load(built, llm, max_batch_queries=4 if batched else 1)
    q = QUESTIONS[0]
    for call in (index.query, lambda *a, **k: list(index.stream(*a, **k))):
        with pytest.raises(TypeError, match="unknown query options"):
            call(q, context="slips through")  # the path without the batcher passed it on before
        with pytest.raises(TypeError, match="unknown query options"):
            call(q, temprature=0.5)
        with pytest.raises(ValueError, match="temperature"):
            call(q, temperature=-1.0)
        with pytest.raises(ValueError, match="mode"):
            call(q, mode="latnet")
        with pytest.raises(ValueError, match="latent mode"):
            call(q, mode="text", prompt="read this instead")
    assert index.batch_stats["items"] == 0
    index.close()


@pytest.mark.parametrize("mode", ["latent", "text", "hybrid"])
def test_alone_batched_and_streamed_answers_are_one_answer(llm, built, mode):
    alone = ContextIndex.load(built, llm, max_batch_queries=1)
    batched = ContextIndex.load(built, llm, max_batch_queries=4, batch_wait_s=0.2)
    questions = QUESTIONS[:3]
    expected = [answer_key(alone.query(q, mode=mode, max_new_tokens=5)) for q in questions]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda q: batched.query(q, mode=mode, max_new_tokens=5), questions))
    assert [answer_key(a) for a in together] == expected
    assert batched.batch_stats["largest"] > 1
    for q, key in zip(questions, expected):
        stats: dict = {}
        text = "".join(alone.stream(q, mode=mode, max_new_tokens=5, stats=stats))
        assert (text, [(c.doc_id, c.chunk, c.level, c.index, c.char_start, c.char_end) for c in stats["citations"]]) == key
    alone.close()
    batched.close()


@pytest.mark.parametrize("mode", ["latent", "text", "hybrid"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("policy", ["query", "lexical"])
def test_the_prompt_is_tokenised_and_checked_once(llm, built, mode, batched, policy, monkeypatch):
    """Also in text mode with more passages than fit the window (the tiny model's 512 positions): each candidate
    passage used to re-render and re-tokenise the whole prompt."""
    index = ContextIndex.load(built, llm, max_batch_queries=4 if batched else 1, top_k=8, policy=policy)
    q = QUESTIONS[1]
    checks = []
    original_check = type(llm).check_length
    monkeypatch.setattr(type(llm), "check_length", lambda self, n: (checks.append(n), original_check(self, n))[1])
    counting = CountingTokenizer(llm.tokenizer, q)
    monkeypatch.setattr(llm, "tokenizer", counting)
    if batched:
        answer = index.query(q, mode=mode, max_new_tokens=4)
    else:
        stats: dict = {}
        "".join(index.stream(q, mode=mode, max_new_tokens=4, stats=stats))
    monkeypatch.undo()
    dropped = answer.stats.text_passages_dropped if batched else stats["text_passages_dropped"]
    if mode != "latent":
        assert dropped > 0  # the fitting path ran
    # latent: the question is the prompt, tokenised once for the query key and the model alike; text and hybrid: the
    # passage prompt once (twice when passages were left out: the full one, then the chosen), and the question alone
    # once more for a key-based policy's query key
    expected = 1 if mode == "latent" else (2 if dropped else 1) + (index.policy != "lexical")
    assert counting.count == expected
    # one check of the request, and the model's own guard at each forward; a streamed answer hands its ids on
    assert checks.count(checks[0]) == (1 if batched else 2) and len(set(checks)) == len(checks) - (0 if batched else 1)
    index.close()


def test_stream_complete_and_batch_are_one_loop(llm, monkeypatch):
    calls = []
    loop = generation.decode
    monkeypatch.setattr(generation, "decode", lambda model, requests: (calls.append(len(requests)), (yield from loop(model, requests)))[1])
    context = "The lantern is green. The keeper is old. " * 3
    streamed = "".join(llm.stream("What colour?", context=context, max_new_tokens=6))
    done = llm.complete("What colour?", context=context, max_new_tokens=6)
    batch = llm.complete_batch(["What colour?", "hi"], options={"max_new_tokens": 6})
    assert calls == [1, 1, 2]
    assert streamed == done.text and done.stats.context_tokens > 0
    assert batch[0].text == llm.complete("What colour?", max_new_tokens=6).text
