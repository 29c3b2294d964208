"""Fixtures of the core suite; the tiny models and tokenizer they build on live in `sharedctx.testing`."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from sharedctx.testing import (  # noqa: F401
    ARCHS,
    VOCAB,
    byte_tokenizer,
    make_llm,
    random_ids,
    set_gates,
    tiny_config,
    tiny_model,
)


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
    # the paper's key-based walk: the tests using this fixture check what the walk and the injection do with keys;
    # the default (lexical) walk has its own tests (test_defaults.py, test_lexical.py)
    return make_llm(gates=1.0, policy="query")


@pytest.fixture
def base_and_llm():
    """A pristine copy of the base model and a SharedLLM over an identical one (identity adapter)."""
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    from sharedctx import SharedCtxConfig, SharedLLM

    return reference, SharedLLM.from_model(base, byte_tokenizer(), config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4, policy="query"))


def word_shards(tmp_path_factory, held: str | None = None):
    """Token shards of a small random-word corpus (three training documents and a held-out ``held.txt``), for the
    trainer's tests; ``held`` replaces the held-out document's text."""
    import numpy as np

    from sharedctx.training.data import TokenShards, build_shards

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["stone", "river", "lamp", "green", "north", "bell", "seven", "quiet"]
    for i in range(3):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 600)))
    (root / "held.txt").write_text(held if held is not None else " ".join(rng.choice(words, 300)))
    out = tmp_path_factory.mktemp("shards")
    build_shards([root], byte_tokenizer(), out, holdout=["held.txt"])
    return TokenShards(out)


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory``: content hash (files), mode and modification time."""
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(directory))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def damage_entry(cache: Path, key: str, at: int, garbage: bytes = b"\xff\xfe") -> bytes:
    """Overwrite ``len(garbage)`` bytes at offset ``at`` of the diskcache entry whose key matches the SQL LIKE pattern
    ``key`` in the cache folder ``cache`` (in its SQLite row, or in its file when stored as one); the damaged bytes."""
    import sqlite3

    con = sqlite3.connect(str(cache / "cache.db"))
    try:
        rowid, value, filename = con.execute("SELECT rowid, value, filename FROM Cache WHERE key LIKE ?", (key,)).fetchone()
        if value is not None:
            bad = bytes(value[:at]) + garbage + bytes(value[at + len(garbage):])
            con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bad, rowid))
            con.commit()
        else:
            path = cache / filename
            raw = path.read_bytes()
            bad = raw[:at] + garbage + raw[at + len(garbage):]
            path.write_bytes(bad)
    finally:
        con.close()
    return bad
