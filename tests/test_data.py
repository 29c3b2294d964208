"""Token shards, the by-file split, the LM-continuation layout and the synthetic task builders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, make_llm
from sharedctx.training.data import (
    DEFAULT_HOLDOUT,
    IGNORE,
    STDLIB_TEXTS,
    TASKS,
    TokenShards,
    build_shards,
    iter_text_files,
    lm_example,
    passkey_example,
)

#: the corpus, as the benchmarks find it without --data (benchmarks/_common.data_root): $SHAREDCTX_DATA, else
#: ../shared/data beside the checkout; the tests that read it are skipped on a clone without one
CORPUS = Path(os.environ.get("SHAREDCTX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS} (set SHAREDCTX_DATA to one)")


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in {"a/one.txt": "alpha beta gamma " * 40, "b/two.txt": "held out text " * 30, "c/three.txt": "x = 1\n" * 50}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "README.md").write_text("not data")
    return root


def test_shards_round_trip_and_split_by_file(corpus, tmp_path):
    tok = byte_tokenizer()
    manifest = build_shards([corpus], tok, tmp_path / "shards", holdout=["b/two.txt"], shard_tokens=700)
    shards = TokenShards(tmp_path / "shards")
    assert shards.manifest == manifest and shards.dtype == np.uint16
    names = {d["name"]: d for d in shards.documents()}
    assert set(names) == {"a/one.txt", "b/two.txt", "c/three.txt"}  # README skipped
    assert [d["name"] for d in shards.documents("eval")] == ["b/two.txt"]
    assert {d["shard"].split("-")[0] for d in shards.documents("train")} == {"train"}
    assert len({d["shard"] for d in shards.documents("train")}) == 2  # shard_tokens forced a second shard
    for name, d in names.items():
        want = tok((corpus / name).read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert shards.tokens(d).tolist() == want
    # samples of the train split never come from the held-out file
    held = shards.tokens("b/two.txt").tolist()
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = shards.sample(16, rng, "train").tolist()
        assert s != held[:16] and all(s != held[i : i + 16] for i in range(0, len(held) - 16, 7))


def test_holdout_typo_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_shards([corpus], byte_tokenizer(), tmp_path / "s", holdout=["b/tow.txt"])


@needs_corpus
def test_default_holdout_names_real_files():
    names = {n for n, _ in iter_text_files([CORPUS])}
    assert set(DEFAULT_HOLDOUT) <= names and len(names) > len(DEFAULT_HOLDOUT)


@needs_corpus
def test_held_out_stdlib_code_is_not_in_the_corpus():
    trained = {p.name.removesuffix(".py.txt").removeprefix("cpython_") for p in (CORPUS / "code").glob("*.py.txt")}
    assert trained  # the corpus has code
    assert not {m.split("/")[0].removesuffix(".py") for m in STDLIB_TEXTS["stdlib:code"]} & trained


def test_lm_layout_scores_only_the_window_and_query_sees_no_scored_token():
    tokens = np.arange(3, 3 + 100)
    ex = lm_example(tokens, context_tokens=64)
    assert ex.context.tolist() == list(range(3, 67)) and ex.input_ids.tolist() == list(range(67, 103))
    assert ex.labels[0] == IGNORE and ex.labels[1:].tolist() == ex.input_ids[1:].tolist()
    assert ex.query_length == 1  # only the first window token, which is never a target
    # the model derives the same query length from the labels
    llm = make_llm(policy="query", gates=1.0)
    seen = []
    original = llm.query_keys
    llm.query_keys = lambda ids, q: (seen.append(list(q)), original(ids, q))[1]
    llm.prepare_injection(ex.context, ex.input_ids[None], labels=ex.labels[None])
    assert seen == [[1]]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_tasks_are_answerable_with_loss_on_the_answer_only(task):
    tok = byte_tokenizer()
    rng = np.random.default_rng(1)
    filler = np.asarray(tok("Filler sentence number one. " * 400, add_special_tokens=False)["input_ids"])
    kwargs = {"chunk_size": 128} if task == "chunk_mention" else {}
    for _ in range(3):
        ex = TASKS[task](tok, rng, length=512, filler=filler, **kwargs)
        scored = ex.labels != IGNORE
        assert scored.any() and not scored[: ex.query_length].any()
        assert tok.decode(ex.labels[scored].tolist(), skip_special_tokens=True) == ex.answer
        assert ex.labels[scored][-1] == tok.eos_token_id
        assert abs(ex.context.numel() - 512) <= 64
        context = tok.decode(ex.context.tolist())
        prompt = tok.decode(ex.input_ids[: ex.query_length].tolist())
        assert ex.answer not in prompt or task == "chunk_mention"  # the answer is not in the question
        if task == "chunk_mention":
            part = int(ex.answer) - 1
            word = prompt.split("secret word ")[1].split()[0]
            assert word in tok.decode(ex.context[part * 128 : (part + 1) * 128].tolist()) or word in tok.decode(ex.context[max(0, part * 128 - 40) : (part + 1) * 128 + 40].tolist())
        else:
            assert ex.answer in context


def test_passkey_depth_places_the_needle():
    tok = byte_tokenizer()
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.5, 1.0):
        ex = passkey_example(tok, rng, length=1000, depth=depth)
        text = tok.decode(ex.context.tolist())
        at = text.index(ex.answer) / len(text)
        assert abs(at - depth) < 0.1
