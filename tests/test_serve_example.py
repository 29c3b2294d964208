"""examples/serve_index.py: several processes answer from one index opened read-only, with the answers one
in-process `ContextIndex` gives (greedy decoding), and the store directory is byte for byte what it was before."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
from conftest import snapshot

from sharedctx import ContextIndex
from sharedctx.testing import make_llm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOAD = functools.partial(make_llm, "llama", gates=1.0)  # picklable: every worker builds the same tiny model
DOCS = {
    "keeper": "The lighthouse keeper writes in the logbook every evening before the lamp is lit. " * 8,
    "baker": "The baker opens the shop at five and sells rye bread to the fishermen on the quay. " * 8,
    "ferry": "The ferry leaves the harbour at noon and reaches the island after two hours at sea. " * 8,
}
QUESTIONS = ["When does the keeper write?", "What does the baker sell?", "When does the ferry leave?",
             "Who sells bread?", "How long is the crossing?", "What is lit in the evening?"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    import serve_index

    yield serve_index
    sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def built(example, tmp_path_factory):
    """An index built and closed first, and the answers of one in-process index over it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("serve") / "index"
    with ContextIndex(LOAD(), store) as index:
        for doc_id, text in DOCS.items():
            index.add_text(text, doc_id=doc_id)
    with ContextIndex.load(store, LOAD(), max_batch_queries=1) as index:
        expected = [example.answer(index, q, NEW_TOKENS) for q in QUESTIONS]
    torch.set_num_threads(threads)
    return store, expected


def same_answers(got: list[dict], expected: list[dict]) -> None:
    assert [(a["question"], a["text"], a["token_ids"], a["documents"]) for a in got] == \
        [(a["question"], a["text"], a["token_ids"], a["documents"]) for a in expected]
    assert all(a["token_ids"] for a in got)  # something was generated
    assert os.getpid() not in {a["pid"] for a in got}  # answered by the workers


def test_a_process_pool_answers_from_one_read_only_store(example, built):
    store, expected = built
    before = snapshot(store)
    got = example.ask_with_processes(str(store), QUESTIONS, LOAD, workers=2, max_new_tokens=NEW_TOKENS)
    same_answers(got, expected)
    assert len({a["pid"] for a in got}) <= 2
    assert snapshot(store) == before


def test_a_ray_serve_deployment_answers_from_one_read_only_store(example, built):
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    store, expected = built
    before = snapshot(store)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        got = example.ask_with_serve(str(store), QUESTIONS, LOAD, workers=2, max_new_tokens=NEW_TOKENS)
    finally:
        serve.shutdown()
        ray.shutdown()
    same_answers(got, expected)
    assert snapshot(store) == before
