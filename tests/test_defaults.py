"""One truth for defaults (issue 22): the lexical walk and the hybrid answer everywhere unless asked otherwise, the
adapter's own training policy only when asked for, and the same decoding defaults in the CLI and the API."""

from __future__ import annotations

import json

import pytest

from conftest import byte_tokenizer, tiny_model
from sharedctx import ContextIndex, SharedCtxConfig, SharedLLM
from sharedctx.cli import _load, build_parser
from sharedctx.config import DEFAULT_MODE, DEFAULT_POLICY, DEFAULT_STOP_ON_REPEAT
from sharedctx.testing import make_llm

#: three facts, each in a chunk of its own (chunk_size 64 tokens of a byte tokenizer), and questions that share words
#: only with their own fact: a walk that reads the question cites a different chunk for each
FACTS = [
    "The lighthouse keeper Ada Penhallow writes the logbook every night at nine. " * 2,
    "The lantern of the Harrow Point light burns a steady green over the harbour. " * 2,
    "Fishing boats from Porthcurn unload mackerel at the northern quay on Tuesdays. " * 2,
]
QUESTIONS = [("Who writes the logbook?", "logbook"), ("What colour does the lantern burn?", "lantern"), ("Where do boats unload mackerel?", "mackerel")]


def test_the_defaults_are_the_lexical_walk_and_the_hybrid_answer():
    assert (DEFAULT_POLICY, DEFAULT_MODE, DEFAULT_STOP_ON_REPEAT) == ("lexical", "hybrid", 8)
    assert SharedCtxConfig().policy == DEFAULT_POLICY
    assert make_llm().config.policy == "lexical"


def test_an_adapter_does_not_bring_its_training_policy_unless_asked(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    trained = SharedLLM.from_pretrained(tmp_path / "base", config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4, policy="right"))
    trained.adapter_trained = True
    trained.save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "sharedctx_adapter.json").read_text())["config"]["policy"] == "right"

    plain = SharedLLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "ad")
    assert plain.config.policy == DEFAULT_POLICY and plain.adapter_policy == "right" and plain.config.injection_layers == 2
    asked = SharedLLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "ad", config=SharedCtxConfig(injection_layers=2, policy="right"))
    assert asked.config.policy == "right"

    # the CLI loads the same way: the adapter's shape, the default policy, --policy when given
    args = build_parser().parse_args(["ask", "q", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--chunk-size", "64"])
    assert _load(args).config.policy == DEFAULT_POLICY
    args = build_parser().parse_args(["ask", "q", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--policy", "right"])
    assert _load(args).config.policy == "right"


def test_a_new_index_walks_lexically_answers_hybrid_and_cites_each_question_its_own_fact(tmp_path):
    llm = make_llm(gates=1.0, chunk_size=64, injection_layers=2, node_keep=4)
    index = ContextIndex(llm, tmp_path / "ix", top_k=1)
    assert index.policy == "lexical"
    for i, fact in enumerate(FACTS):
        index.add_text(fact, doc_id=f"fact{i}")
    tops = []
    for question, word in QUESTIONS:
        answer = index.query(question, max_new_tokens=2)
        assert answer.stats.mode == DEFAULT_MODE
        top = answer.citations[0].doc_id
        assert word in "".join(c.text for c in answer.citations if c.doc_id == top)  # the chunk that holds the answer
        tops.append(top)
    assert tops == ["fact0", "fact1", "fact2"]
    # the key-based walk the shipped adapter was trained with stays available when asked for
    assert ContextIndex(llm, tmp_path / "ix2", policy="right").policy == "right"


def test_a_model_without_tokenizer_says_how_to_walk():
    llm = make_llm(tokenizer=False, policy="lexical")
    with pytest.raises(ValueError, match="policy='query'"):
        llm.prepare_injection(list(range(10, 80)), llm.prompt_ids([5, 6, 7]))
    assert make_llm(tokenizer=False).config.policy == "query"
