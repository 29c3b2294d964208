"""Fixtures of the core suite; the tiny models and tokenizer they build on live in `sharedctx.testing`."""

from __future__ import annotations

import copy

import pytest
import torch

from sharedctx.testing import ARCHS, VOCAB, byte_tokenizer, make_llm, random_ids, set_gates, tiny_config, tiny_model  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and on a shared machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llm():
    return make_llm(gates=1.0)


@pytest.fixture
def base_and_llm():
    """A pristine copy of the base model and a SharedLLM over an identical one (identity adapter)."""
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    from sharedctx import SharedCtxConfig, SharedLLM

    return reference, SharedLLM.from_model(base, byte_tokenizer(), config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4))
