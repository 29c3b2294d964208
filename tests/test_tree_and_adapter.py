"""Save/load round trips of context trees and adapters, and refusal of mismatched ones."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_llm, random_ids, tiny_model, byte_tokenizer
from sharedctx import SharedCtxConfig, SharedLLM
from sharedctx.errors import AdapterMismatchError
from sharedctx.tree import ContextTree, TreeFormatError


def test_tree_save_load_round_trip(tmp_path):
    llm = make_llm(gates=1.0)
    text = "The lantern is green. " * 20
    tree = llm.encode(text)
    assert tree.text == text and tree.offsets.shape == (tree.n_tokens, 2)
    tree.save(tmp_path / "t.safetensors")
    back = ContextTree.load(tmp_path / "t.safetensors")
    assert back.precomputed and set(back.nodes) == set(tree.nodes) and back.text == text
    ids = random_ids(7)[None]
    with torch.no_grad():
        assert torch.equal(llm(ids, context=tree).logits, llm(ids, context=back).logits)
    s, e = tree.node_span((0, 1, 1))
    assert tree.char_span(s, e) == (tree.offsets[s, 0].item(), tree.offsets[e - 1, 1].item())


def test_corrupt_tree_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(TreeFormatError):
        ContextTree.load(path)


def test_adapter_round_trip_writes_only_the_delta(tmp_path):
    llm = make_llm(gates=0.7)
    llm.save_pretrained(tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter.safetensors", "sharedctx_adapter.json"]
    meta = json.loads((tmp_path / "ad" / "sharedctx_adapter.json").read_text())
    assert meta["base_fingerprint"] == llm.fingerprint and meta["sharedctx_version"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert all(k.split(".")[1] in ("norm", "q_proj", "o_proj", "gate", "q_norm") for k in weights)
    fresh = make_llm()  # same base weights (same seed), identity adapter
    ids, ctx = random_ids(6)[None], random_ids(80, seed=2)
    with torch.no_grad():
        assert not torch.equal(fresh(ids, context=ctx).logits, llm(ids, context=ctx).logits)
        fresh.load_adapter(tmp_path / "ad")
        assert torch.equal(fresh(ids, context=ctx).logits, llm(ids, context=ctx).logits)


def test_adapter_for_another_base_is_refused(tmp_path):
    make_llm(gates=0.5).save_pretrained(tmp_path / "ad")
    other = make_llm(seed=3)
    with pytest.raises(AdapterMismatchError, match="made for base model"):
        other.load_adapter(tmp_path / "ad")
    deeper = make_llm(injection_layers=3)
    with pytest.raises(AdapterMismatchError, match="injection_layers"):
        deeper.load_adapter(tmp_path / "ad")
    with pytest.raises(AdapterMismatchError, match="missing"):
        make_llm().load_adapter(tmp_path)


def test_from_pretrained_with_local_base_and_adapter(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    llm = SharedLLM.from_pretrained(tmp_path / "base", config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4))
    with torch.no_grad():
        llm.injection[0].gate.fill_(0.3)
    llm.adapter_trained = True
    llm.save_pretrained(tmp_path / "ad")
    again = SharedLLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "ad")
    assert again.config.injection_layers == 2 and again.adapter_trained
    ids, ctx = random_ids(5)[None], random_ids(70)
    with torch.no_grad():
        assert torch.equal(llm(ids, context=ctx).logits, again(ids, context=ctx).logits)
    with pytest.raises(AdapterMismatchError, match="incompatible"):
        SharedLLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "ad", config=SharedCtxConfig(injection_layers=3))


def test_fingerprint_is_stable_across_dtypes():
    a = make_llm()
    b = make_llm()
    b.to(torch.bfloat16)
    from sharedctx.base_model import base_fingerprint

    assert base_fingerprint(a.base) == base_fingerprint(b.base)
    assert base_fingerprint(make_llm(seed=5).base) != a.fingerprint
