from __future__ import annotations

import pytest

from sharedctx.testing import make_llm

CONTEXT = (
    "The Harrow Point light stands on a granite spit. Its keeper, Ada Lindqvist, writes the logbook every night. "
    "The lantern burns green so that ships can tell it from the harbour lights. "
) * 2


def contains(seq: list[int], sub: list[int]) -> bool:
    """Whether ``sub`` occurs in ``seq`` as a contiguous run."""
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


@pytest.fixture(scope="session")
def llm():
    """A tiny SharedLLM whose cross-attention is switched on (gates != 0), so injected states change the output."""
    return _shared_llm()


@pytest.fixture(scope="session")
def context_text() -> str:
    return CONTEXT

DOCS = {
    "harrow": CONTEXT,
    "bread": "To bake bread, mix flour, water, salt and yeast. Knead for ten minutes and let it rise. " * 3,
    "trains": "The night train to Oslo leaves at nine from platform four and arrives at dawn. " * 3,
}

_INDEX = {}


def shared_index():
    """One ContextIndex over DOCS (in a temporary store) for the whole session, built on first use."""
    if "index" not in _INDEX:
        from sharedctx.index import ContextIndex

        index = ContextIndex(_shared_llm(), top_k=2)
        for doc_id, text in DOCS.items():
            index.add_text(text, doc_id=doc_id, metadata={"topic": doc_id})
        _INDEX["index"] = index
    return _INDEX["index"]


def _shared_llm():
    if "llm" not in _INDEX:
        _INDEX["llm"] = make_llm(gates=1.0)
    return _INDEX["llm"]


@pytest.fixture(scope="session")
def index():
    return shared_index()
