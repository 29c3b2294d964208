"""Adapters stored as low-rank deltas over each layer's own attention projections (``cross_rank``, issue 25): the
model equals the base at first, the base stays frozen, files round-trip exactly, a full adapter converts by truncated
SVD, and full adapters written before these fields existed still load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llm, random_ids, tiny_model

from sharedctx.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, low_rank_state, save_low_rank_adapter
from sharedctx.errors import AdapterMismatchError


def _logits(llm, ids, ctx):
    with torch.no_grad():
        return llm(ids, context=ctx).logits


IDS, CTX = random_ids(20, 1)[None], random_ids(96, 2)


def test_a_low_rank_adapter_equals_the_base_at_first_and_holds_only_deltas_norms_and_gates():
    llm = make_llm(cross_rank=3)
    pristine = tiny_model("llama")
    torch.testing.assert_close(_logits(llm, IDS, CTX), pristine(input_ids=IDS).logits, atol=0, rtol=0)
    names = {n for n, _ in llm.adapter_named_parameters()}
    assert names == {f"{i}.{p}" for i in range(2) for p in (
        "norm.weight", "gate", "q_proj.lora_a", "q_proj.lora_b", "o_proj.lora_a", "o_proj.lora_b")}
    base_ids = {id(p) for p in llm.base.parameters() if not p.requires_grad}
    own = llm.base.model.layers[0].layer.self_attn
    assert id(own.q_proj.weight) in base_ids and not own.q_proj.weight.requires_grad
    assert llm.injection[0].q_proj.base is own.q_proj  # shared, not copied
    full = sum(p.numel() for _, p in make_llm().adapter_named_parameters())
    low = sum(p.numel() for _, p in llm.adapter_named_parameters())
    assert low < full / 2


def test_training_a_low_rank_adapter_moves_only_its_deltas(tmp_path):
    llm = make_llm(cross_rank=2, gates=1.0)
    own = {n: p.detach().clone() for n, p in llm.base.named_parameters() if ".cross." not in n}
    params = [p for _, p in llm.adapter_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    labels = IDS.clone()
    for _ in range(3):
        llm(IDS, context=CTX, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in llm.base.named_parameters():
        assert ".cross." in n or torch.equal(p, own[n]), n
    assert float(llm.injection[0].o_proj.lora_b.abs().sum()) > 0


def test_low_rank_adapters_round_trip_exactly(tmp_path):
    llm = make_llm(cross_rank=3, gates=1.0, null_kv=True)
    with torch.no_grad():
        for _, p in llm.adapter_named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    llm.save_pretrained(tmp_path / "a")
    again = make_llm(cross_rank=3, null_kv=True)
    again.load_adapter(tmp_path / "a")
    torch.testing.assert_close(_logits(again, IDS, CTX), _logits(llm, IDS, CTX), atol=0, rtol=0)
    with pytest.raises(AdapterMismatchError, match="cross_rank"):
        make_llm(null_kv=True).load_adapter(tmp_path / "a")


def test_a_full_adapter_converts_to_low_rank_deltas(tmp_path):
    full = make_llm(gates=1.0)  # q_proj perturbed by a full-rank random matrix; o_proj by a rank-2 delta
    with torch.no_grad():
        for i, block in enumerate(full.injection):
            g = torch.Generator().manual_seed(i)
            block.o_proj.weight.add_(torch.randn(block.o_proj.weight.shape[0], 2, generator=g) @ torch.randn(2, block.o_proj.weight.shape[1], generator=g) * 0.1)
    _, errors = low_rank_state(full, 2)
    assert all(errors[f"{i}.o_proj"] < 1e-5 for i in range(2)) and all(0 < errors[f"{i}.q_proj"] < 1 for i in range(2))
    # a delta of the rank kept converts exactly: perturb q_proj at rank 2 as well
    with torch.no_grad():
        for i, block in enumerate(full.injection):
            block.q_proj.weight.copy_(full.base.model.layers[i].layer.self_attn.q_proj.weight)
            g = torch.Generator().manual_seed(10 + i)
            block.q_proj.weight.add_(torch.randn(block.q_proj.weight.shape[0], 2, generator=g) @ torch.randn(2, block.q_proj.weight.shape[1], generator=g) * 0.1)
    errors = save_low_rank_adapter(full, tmp_path / "low", 2)
    assert max(errors.values()) < 1e-5
    meta = json.loads((tmp_path / "low" / ADAPTER_CONFIG).read_text())
    assert meta["config"]["cross_rank"] == 2
    low = make_llm(cross_rank=2)
    low.load_adapter(tmp_path / "low")
    torch.testing.assert_close(_logits(low, IDS, CTX), _logits(full, IDS, CTX), atol=1e-5, rtol=1e-4)
    full.save_pretrained(tmp_path / "full")
    assert (tmp_path / "low" / ADAPTER_WEIGHTS).stat().st_size < (tmp_path / "full" / ADAPTER_WEIGHTS).stat().st_size
    with pytest.raises(ValueError, match="already"):
        low_rank_state(low, 2)


def test_a_full_adapter_written_before_these_fields_still_loads(tmp_path):
    llm = make_llm(gates=1.0)
    llm.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / ADAPTER_CONFIG
    meta = json.loads(path.read_text())
    for key in ("null_kv", "cross_rank"):
        del meta["config"][key]  # as an adapter of an earlier version wrote it
    path.write_text(json.dumps(meta))
    again = make_llm()
    again.load_adapter(tmp_path / "old")
    torch.testing.assert_close(_logits(again, IDS, CTX), _logits(llm, IDS, CTX), atol=0, rtol=0)


def test_cross_rank_is_validated():
    from sharedctx import SharedCtxConfig

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cross_rank"):
            SharedCtxConfig(cross_rank=bad)
