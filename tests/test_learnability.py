"""The injection path can learn a content lookup (issue 18): a guard of the mechanism that no equality test gives.

A tiny random LLaMA is trained from scratch (base + adapter) on `sharedctx.training.lookup`: the context holds fresh
random key -> value records, the window asks keys. Reading through the injection must reach high accuracy with the true
context and stay at chance with an unrelated one; the same holds without chunk positions and with one injected layer.
Breaking the mechanism on purpose (gates held at zero, injected keys shuffled) must fail the same thresholds.
"""

from __future__ import annotations

import pytest
import torch

from sharedctx.config import SharedCtxConfig
from sharedctx.model import SharedLLM
from sharedctx.training.lookup import (
    LookupTask,
    LookupTrainConfig,
    base_model,
    batch_injection,
    lookup_model,
    shuffled_keys,
    train_in_context,
    train_lookup,
)

TASK = LookupTask()  # one-token records, 16 keys, 16 values, 1-4 chunks of 4 tokens, 4 questions a window
STEPS = 400  # the lookup is learnt by step 200-300 on seeds 0-3; 400 leaves a margin
#: reading: the value is found; at chance: an unrelated context tells nothing (chance is 1/16)
READ, CHANCE_MARGIN = 0.9, 0.1


def config(**changes) -> SharedCtxConfig:
    # tree height 1 over 4-token chunks: two nodes of 2 states a chunk, all kept (full resolution)
    fields = {"injection_layers": 2, "chunk_size": 4, "tree_height": 1, "node_keep": 2, "policy": "right"}
    return SharedCtxConfig(**{**fields, **changes})


def run(cfg: SharedCtxConfig, steps: int = STEPS, hook=None, **train):
    llm = lookup_model(TASK, cfg)
    return train_lookup(llm, TASK, LookupTrainConfig(steps=steps, eval_every=steps, **train), hook=hook)


def assert_reads(result) -> None:
    assert result.acc_true >= READ, result
    assert result.acc_unrelated <= result.chance + CHANCE_MARGIN, result


def test_batched_injection_equals_prepare_injection(one_thread):
    llm = lookup_model(TASK, config())
    b = TASK.sample(3, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = batch_injection(llm, b.context)
        rows = llm.prepare_injection(list(b.context), b.window)
    for a, c in zip(batched.keys + batched.values, rows.keys + rows.values):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert torch.equal(batched.key_pos, rows.key_pos) and torch.equal(batched.query_pos, rows.query_pos)
    assert batched.query_pos.tolist() == [3, 3, 3]


def test_learns_lookup_through_injection(one_thread):
    """The default path: chunk positions on, both bottom layers injected, read through `SharedLLM.forward(context=)`."""
    assert_reads(run(config()))


@pytest.mark.slow
def test_learns_without_chunk_positions(one_thread):
    assert_reads(run(config(positions="none")))


@pytest.mark.slow
def test_learns_with_one_injected_layer(one_thread):
    assert_reads(run(config(injection_layers=1)))


@pytest.mark.slow
def test_adapter_alone_learns_to_read_for_a_base_that_knows_the_task(one_thread):
    """The situation of a pretrained base: the base first learns the task in context (full attention over
    [context ; window]), is then frozen, and only the adapter (cross-attention blocks initialised from the layers'
    own attention) learns to read the same records through the injection."""
    base = base_model(TASK)
    in_context = train_in_context(base, TASK, LookupTrainConfig(steps=STEPS, eval_every=STEPS))
    assert in_context.acc_true >= READ, in_context
    llm = SharedLLM.from_model(base, None, config=config())
    assert_reads(train_lookup(llm, TASK, LookupTrainConfig(steps=STEPS, eval_every=STEPS, train_base=False)))


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["gates held at zero", "keys shuffled"])
def test_a_broken_mechanism_fails_the_guard(one_thread, broken):
    """The thresholds of the guard catch a mechanism that cannot read (so its passing means something)."""
    if broken == "gates held at zero":
        result = run(config(), zero_gates=(0, 1))
    else:
        result = run(config(), hook=shuffled_keys())
    assert result.acc_true < READ - 0.3, result


def test_benchmark_quick(one_thread, tmp_path, monkeypatch):
    """``benchmarks/bench_learnability.py --quick`` runs end to end and writes its JSON and PNG."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_learnability

    r = bench_learnability.main(["--quick", "--out", str(tmp_path), "--arms", "default", "pairs_in_context"])
    assert set(r["arms"]) == {"default", "pairs_in_context"}
    assert all(0.0 <= a["acc_true"] <= 1.0 and a["steps"] == 4 for a in r["arms"].values())
    assert r["machine"]["torch_threads"] == 1 and (tmp_path / "learnability_quick.png").is_file()
