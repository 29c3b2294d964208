from __future__ import annotations

import pytest

from sharedctx.testing import GenerationSpy as Spy  # noqa: F401  (the tests import it from here)
from sharedctx.testing import make_llm

DOCS = {
    "harrow": (
        "The Harrow Point light stands on a granite spit. Its keeper, Ada Lindqvist, writes the logbook every night. "
        "The lantern burns green so that ships can tell it from the harbour lights. "
    ) * 2,
    "bread": "To bake bread, mix flour, water, salt and yeast. Knead for ten minutes and let it rise. " * 3,
    "trains": "The night train to Oslo leaves at nine from platform four and arrives at dawn. " * 3,
}

_SHARED = {}


def contains(seq: list[int], sub: list[int]) -> bool:
    """Whether ``sub`` occurs in ``seq`` as a contiguous run."""
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def documents():
    from llama_index.core import Document

    return [Document(text=text, id_=doc_id, metadata={"topic": doc_id}) for doc_id, text in DOCS.items()]


@pytest.fixture(scope="session")
def llm():
    """A tiny SharedLLM whose cross-attention is switched on (gates != 0), so injected states change the output; with
    a 4,096-position window (byte tokens), room for LlamaIndex's own refine and summary prompts."""
    if "llm" not in _SHARED:
        from sharedctx import SharedCtxConfig, SharedLLM
        from sharedctx.testing import byte_tokenizer, set_gates, tiny_model

        reference = make_llm()  # the options make_llm gives every tiny test model
        _SHARED["llm"] = SharedLLM.from_model(tiny_model("llama", 0, max_position_embeddings=4096), byte_tokenizer(), config=SharedCtxConfig(
            **{k: getattr(reference.config, k) for k in ("injection_layers", "chunk_size", "tree_height", "node_keep")}))
        set_gates(_SHARED["llm"], 1.0)
    return _SHARED["llm"]


@pytest.fixture(scope="session")
def index(llm):
    """One SharedContextIndex over DOCS for the session (read-only in tests)."""
    from llama_index.indices.sharedctx import SharedContextIndex

    return SharedContextIndex.from_documents(documents(), llm=llm, top_k=2)


