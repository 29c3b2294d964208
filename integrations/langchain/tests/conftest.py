from __future__ import annotations

import pytest

from lc_tiny import make_llm

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
    return make_llm(gates=1.0)


@pytest.fixture(scope="session")
def context_text() -> str:
    return CONTEXT
