"""Batched answering: one forward for several prompts gives each prompt the answer it gets alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_llm, random_ids
from sharedctx.concurrency import MicroBatcher
from sharedctx.injection import Injection

pytestmark = pytest.mark.usefixtures("one_thread")


def _contexts():
    return [random_ids(96, seed=1), random_ids(40, seed=2), random_ids(200, seed=3)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batch_equals_each_prompt_alone(arch):
    llm = make_llm(arch, gates=1.0)
    prompts = ["Where is the key?", "Say something long about lighthouses and ships", "hi"]
    ctxs = _contexts()
    injections = []
    for p, c in zip(prompts, ctxs):
        ids = llm.prompt_ids(p)
        injections.append(llm.prepare_injection(c, ids))
    injections[1] = None  # one row reads nothing
    options = [dict(max_new_tokens=12), dict(max_new_tokens=5), dict(max_new_tokens=9, temperature=0.8, top_k=20, seed=7)]
    batch = llm.complete_batch(prompts, injections=injections, options=options)
    for p, c, inj, o, got in zip(prompts, ctxs, injections, options, batch):
        alone = llm.complete(p, context=c if inj is not None else None, **o)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text
        assert got.stats["batch_size"] == 3
        assert got.stats["injected_states"] == (0 if inj is None else inj.n_states)


def test_batch_logits_equal_single_rows_with_padding():
    """The padded prefill gives every row the next-token logits of its unpadded forward."""
    llm = make_llm(gates=1.0)
    prompts = [random_ids(7, seed=4), random_ids(19, seed=5)]
    injections = [llm.prepare_injection(c, p[None]) for c, p in zip(_contexts(), prompts)]
    stacked = Injection.stack(injections)
    width = 19
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1
    with torch.no_grad():
        out = llm(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), injection=stacked).logits[:, -1]
        for b, p in enumerate(prompts):
            alone = llm(p[None], injection=injections[b]).logits[:, -1]
            torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_stack_pads_masks_and_keeps_provenance():
    llm = make_llm(gates=1.0)
    a = llm.prepare_injection(random_ids(200, seed=3), random_ids(5)[None])
    b = llm.prepare_injection(random_ids(40, seed=2), random_ids(5)[None])
    s = Injection.stack([a, None, b])
    assert s.n_states == max(a.n_states, b.n_states) and s.keys[0].shape[0] == 3
    assert s.key_mask[0].sum() == a.n_states and s.key_mask[1].sum() == 0 and s.key_mask[2].sum() == b.n_states
    assert s.nodes[1] == [] and len(s.nodes[0]) == len(a.nodes[0])
    assert Injection.stack([None, None]) is None
    with pytest.raises(ValueError, match="one-row"):
        Injection.stack([s])


def test_batch_respects_eos_stop_and_zero_tokens():
    llm = make_llm(gates=1.0)
    first = llm.complete("abc", max_new_tokens=6)
    assert first.text, "the tiny model must produce text for this test to mean anything"
    stop = first.text[2:4] if len(first.text) >= 4 else first.text[-1]
    batch = llm.complete_batch(["abc", "abc", "abc"], options=[dict(max_new_tokens=6, stop=[stop]), dict(max_new_tokens=0), dict(max_new_tokens=6)])
    assert batch[0].text == llm.complete("abc", max_new_tokens=6, stop=[stop]).text
    assert stop not in batch[0].text
    assert batch[1].text == "" and batch[1].token_ids == []
    assert batch[2].token_ids == first.token_ids


def test_batch_input_errors():
    llm = make_llm()
    assert llm.complete_batch([]) == []
    with pytest.raises(ValueError, match="injections"):
        llm.complete_batch(["a", "b"], injections=[None])
    with pytest.raises(ValueError, match="option dicts"):
        llm.complete_batch(["a", "b"], options=[{}])
    with pytest.raises(TypeError, match="unknown generation options"):
        llm.complete_batch(["a"], options={"temprature": 1.0})


# ---------------------------------------------------------------------- the micro-batcher
def test_microbatcher_gathers_concurrent_items():
    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        return [x * 2 for x in items]

    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.5)
    results = [None] * 8
    barrier = threading.Barrier(8)

    def call(i):
        barrier.wait()
        results[i] = batcher.submit(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == [2 * i for i in range(8)]
    assert sum(seen) == 8 and max(seen) > 1
    assert batcher.stats["items"] == 8 and batcher.stats["largest"] == max(seen)


def test_microbatcher_isolates_a_failing_item():
    def run(items):
        if any(x < 0 for x in items):
            raise ValueError(f"negative in {items}")
        return [x + 1 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.3)
    out: dict[int, object] = {}
    barrier = threading.Barrier(3)

    def call(x):
        barrier.wait()
        try:
            out[x] = batcher.submit(x)
        except ValueError as exc:
            out[x] = exc

    threads = [threading.Thread(target=call, args=(x,)) for x in (1, -1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert out[1] == 2 and out[5] == 6
    assert isinstance(out[-1], ValueError) and "[-1]" in str(out[-1])


def test_microbatcher_lone_item_and_close():
    batcher = MicroBatcher(lambda items: list(items), max_batch=4, max_wait_s=0.001)
    assert batcher.submit(3) == 3
    assert batcher.stats == {"batches": 1, "items": 1, "largest": 1}
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda items: items, max_batch=0)


def test_microbatcher_worker_ends_when_idle_and_restarts():
    batcher = MicroBatcher(lambda items: [x + 1 for x in items], max_batch=2, max_wait_s=0.001, idle_s=0.05)
    assert batcher.submit(1) == 2
    worker = batcher._worker
    worker.join(timeout=5)
    assert not worker.is_alive() and batcher._worker is None
    assert batcher.submit(2) == 3  # a new worker serves later requests
    batcher.close()


def test_microbatcher_reports_a_wrong_number_of_results():
    batcher = MicroBatcher(lambda items: [], max_batch=2, max_wait_s=0.001)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        batcher.submit(1)
    batcher.close()
