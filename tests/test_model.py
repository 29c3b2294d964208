"""Invariants of the method on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, byte_tokenizer, make_llm, random_ids, set_gates, tiny_model
from sharedctx import SharedCtxConfig, SharedLLM
from sharedctx.errors import ContextMismatchError, PromptTooLongError


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_ctx", [0, 5, 32, 77, 200])
@pytest.mark.parametrize("precompute", [True, False])
def test_untrained_adapter_equals_base(arch, n_ctx, precompute):
    base = tiny_model(arch)
    reference = copy.deepcopy(base)
    llm = SharedLLM.from_model(base, config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4, policy="query"))
    ids = random_ids(12, seed=1)[None]
    context = llm.encode(random_ids(n_ctx, seed=2), precompute=precompute)
    with torch.no_grad():
        got = llm(ids, context=context).logits
        want = reference(ids).logits
    assert torch.equal(got, want)
    if n_ctx:
        inj = llm.prepare_injection(context, ids)
        assert inj is not None and inj.n_states > 0  # states were injected, and still nothing changed


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_gates_change_output(arch):
    llm = make_llm(arch, gates=1.0)
    ids = random_ids(8, seed=1)[None]
    with torch.no_grad():
        with_ctx = llm(ids, context=random_ids(70, seed=3)).logits
        without = llm(ids).logits
    assert (with_ctx - without).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("positions", ["chunk", "none"])
@pytest.mark.parametrize("upper_lora_rank", [0, 3])
def test_decoding_equals_full_forward(arch, positions, upper_lora_rank):
    llm = make_llm(arch, gates=1.0, positions=positions, upper_lora_rank=upper_lora_rank)
    context = llm.encode(random_ids(100, seed=4))
    prompt = random_ids(9, seed=5)[None]
    steps = random_ids(6, seed=6)[None]
    with torch.no_grad():
        inj = llm.prepare_injection(context, prompt)
        out = llm(prompt, injection=inj, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = [out.logits]
        for t in range(steps.shape[1]):
            out = llm(steps[:, t : t + 1], injection=inj, past_key_values=cache, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            logits.append(out.logits)
        incremental = torch.cat(logits, dim=1)
        full = llm(torch.cat([prompt, steps], dim=1), context=context, query_length=prompt.shape[1]).logits
    torch.testing.assert_close(incremental, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["query", "lexical", "right", "left", "random"])
@pytest.mark.parametrize("n_ctx", [32, 101, 130])
def test_precomputed_equals_on_the_fly(policy, n_ctx):
    llm = make_llm(gates=1.0, policy=policy)
    text_ids = random_ids(n_ctx, seed=7)
    ids = random_ids(10, seed=8)[None]
    pre = llm.encode(text_ids, precompute=True)
    lazy = llm.encode(text_ids, precompute=False)
    assert pre.precomputed and not lazy.precomputed
    with torch.no_grad():
        a = llm.prepare_injection(pre, ids)
        b = llm.prepare_injection(lazy, ids)
        assert [(n.chunk, n.level, n.index, n.start, n.end) for n in a.nodes[0]] == [
            (n.chunk, n.level, n.index, n.start, n.end) for n in b.nodes[0]
        ]
        for ka, kb in zip(a.keys + a.values, b.keys + b.values):
            torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.key_pos, b.key_pos) and torch.equal(a.query_pos, b.query_pos)
        torch.testing.assert_close(llm(ids, injection=a).logits, llm(ids, injection=b).logits, atol=1e-5, rtol=1e-5)


def test_policies_select_different_nodes():
    ids = random_ids(10, seed=8)[None]
    chosen = {}
    for policy in ("right", "left"):
        llm = make_llm(policy=policy)
        inj = llm.prepare_injection(llm.encode(random_ids(64, seed=9)), ids)
        chosen[policy] = [(n.level, n.index) for n in inj.nodes[0] if n.chunk == 0]
    # expanding right preserves the left halves, and vice versa
    assert chosen["right"] == [(1, 0), (2, 2), (3, 6), (3, 7)]
    assert chosen["left"] == [(3, 0), (3, 1), (2, 1), (1, 1)]


def test_chunk_positions_rotate_keys_and_queries():
    llm = make_llm(gates=1.0)
    inj = llm.prepare_injection(llm.encode(random_ids(100, seed=10)), random_ids(5, seed=1)[None])
    # 4 chunks (32, 32, 32, 4 tokens); keys of chunk i are at position i, the queries at n = 4
    expected = torch.cat([torch.full((n.n_states,), n.chunk) for n in inj.nodes[0]])
    assert torch.equal(inj.key_pos[0], expected)
    assert inj.query_pos.tolist() == [4]
    assert make_llm(positions="none").prepare_injection(llm.encode(random_ids(100, seed=10)), random_ids(5)[None]).key_pos is None


@pytest.mark.parametrize("positions,changes", [("chunk", True), ("none", False)])
def test_reordering_chunks_matters_only_with_chunk_positions(positions, changes):
    llm = make_llm(gates=1.0, positions=positions, policy="right")
    chunks = [random_ids(32, seed=20 + i) for i in range(3)]
    ids = random_ids(8, seed=11)[None]
    with torch.no_grad():
        forward = llm(ids, context=torch.cat(chunks)).logits
        backward = llm(ids, context=torch.cat(chunks[::-1])).logits
    diff = (forward - backward).abs().max().item()
    if changes:
        assert diff > 1e-4
    else:
        assert diff < 1e-5


def test_query_policy_expands_the_more_similar_child():
    from sharedctx.ops import cosine_scores

    llm = make_llm(policy="query")
    tree = llm.encode(random_ids(96, seed=12))
    ids = random_ids(7, seed=13)[None]
    qkey = llm.query_keys(ids, [7])[0]
    inj = llm.prepare_injection(tree, ids)
    preserved = {(n.chunk, n.level, n.index) for n in inj.nodes[0]}
    for chunk in range(tree.n_chunks):
        level, index = 0, 0
        for _ in range(tree.tree_height - 1):
            left, right = (chunk, level + 1, 2 * index), (chunk, level + 1, 2 * index + 1)
            s = cosine_scores(qkey, torch.stack([tree.nodes[left].key, tree.nodes[right].key]))
            expand, keep = (right, left) if s[1] >= s[0] else (left, right)
            assert keep in preserved and expand not in preserved
            level, index = expand[1], expand[2]


def test_no_target_token_reaches_the_query():
    llm = make_llm(gates=1.0, policy="query")
    tree = llm.encode(random_ids(128, seed=14))
    ids = random_ids(20, seed=15)[None]
    labels = ids.clone()
    labels[:, :12] = -100  # tokens 12.. are scored: the query may see tokens 0..11 only
    changed = ids.clone()
    changed[:, 12:] = random_ids(8, seed=16)
    a = llm.prepare_injection(tree, ids, labels=labels)
    b = llm.prepare_injection(tree, changed, labels=labels)
    c = llm.prepare_injection(tree, ids, query_length=12)
    key = lambda inj: [(n.chunk, n.level, n.index) for n in inj.nodes[0]]
    assert key(a) == key(b) == key(c)
    # and the query keys are the prefix's, not the whole window's
    assert torch.equal(llm.query_keys(ids, [12]), llm.query_keys(changed, [12]))
    assert not torch.equal(llm.query_keys(ids, [20]), llm.query_keys(changed, [20]))
    out = llm(ids, context=tree, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_batched_contexts_equal_single_rows():
    llm = make_llm(gates=1.0)
    contexts = [random_ids(40, seed=30), random_ids(100, seed=31)]  # ragged numbers of states
    ids = torch.stack([random_ids(6, seed=32), random_ids(6, seed=33)])
    with torch.no_grad():
        batched = llm(ids, context=contexts).logits
        rows = torch.cat([llm(ids[i : i + 1], context=contexts[i]).logits for i in range(2)])
    torch.testing.assert_close(batched, rows, atol=1e-5, rtol=1e-5)


def test_nodes_are_encoded_in_few_batched_passes():
    llm = make_llm(chunk_size=32, tree_height=3)
    llm.encoder.passes = 0
    llm.encode(random_ids(32 * 8, seed=17))
    # eight full chunks: one pass per node length (16, 8, 4) plus one pass over the chunk roots for their keys
    assert llm.encoder.passes == 4


def test_bad_inputs():
    llm = make_llm(gates=1.0)
    ids = random_ids(6)[None]
    with pytest.raises(PromptTooLongError, match="context"):
        llm(random_ids(600)[None], context=random_ids(40))
    with pytest.raises(ValueError, match="token ids must lie"):
        llm.encode(torch.tensor([5, 999999]))
    other = make_llm(seed=1)
    with pytest.raises(ContextMismatchError, match="another|not"):
        llm(ids, context=other.encode(random_ids(40)))
    tree = make_llm(chunk_size=16).encode(random_ids(40))
    with pytest.raises(ContextMismatchError, match="chunk_size"):
        llm(ids, context=tree)
    with pytest.raises(ValueError, match="query lengths"):
        llm(ids, context=random_ids(40), query_length=0)
    # a context shorter than a chunk, and one token, both work
    for n in (1, 3, 31):
        assert llm(ids, context=random_ids(n)).logits.shape == (1, 6, 300)


def test_mixed_dtypes_and_devices_of_inputs():
    llm = make_llm(gates=1.0)
    tree = llm.encode(random_ids(70))
    ids32 = random_ids(6)[None].to(torch.int32)
    with torch.no_grad():
        ref = llm(ids32.long(), context=tree).logits
        got = llm(ids32, context=tree).logits
        assert torch.equal(ref, got)
        llm.to(torch.bfloat16)  # a tree encoded in float32 serves a bfloat16 model (states are cast)
        low = llm(ids32, context=tree).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


def test_config_validation():
    with pytest.raises(ValueError, match="policy"):
        SharedCtxConfig(policy="best")
    with pytest.raises(ValueError, match="chunk_size"):
        SharedCtxConfig(chunk_size=4, tree_height=3)
    with pytest.raises(ValueError, match="node_keep"):
        SharedCtxConfig(node_keep=0)
    with pytest.raises(ValueError, match="exceeds"):
        SharedLLM.from_model(tiny_model(), config=SharedCtxConfig(injection_layers=5))


def test_unsupported_model_is_refused():
    from sharedctx.base_model import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="LLaMA-family"):
        SharedLLM.from_model(torch.nn.Linear(2, 2))


def test_training_updates_only_the_adapter():
    llm = make_llm(gates=0.0)
    llm.train()
    before = {k: v.clone() for k, v in llm.base.state_dict().items() if ".cross." not in k}
    opt = torch.optim.AdamW(llm.trainable_parameters(), lr=1e-2)
    ids = random_ids(24, seed=40)[None]
    labels = ids.clone()
    labels[:, :8] = -100
    for _ in range(2):
        loss = llm(ids, context=random_ids(90, seed=41), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(g.gate.item() != 0.0 for g in llm.injection)
    after = {k: v for k, v in llm.base.state_dict().items() if ".cross." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_split_noise_only_while_training_and_nodes_tile_chunks():
    llm = make_llm(split_noise=0.2, policy="random")
    tree = llm.encode(random_ids(130, seed=50), precompute=False)
    llm.train()
    spans_train = llm.select(tree, None, generator=torch.Generator().manual_seed(3)).spans
    llm.eval()
    spans_eval = llm.select(tree, None).spans
    for spans in (spans_train, spans_eval):
        for chunk, (s, e) in enumerate(tree.spans):
            inside = sorted(sp for sp in spans if s <= sp[0] < e)
            assert inside[0][0] == s and inside[-1][1] == e
            assert all(a[1] == b[0] for a, b in zip(inside, inside[1:]))  # they tile the chunk
    assert spans_train != spans_eval  # noise moved at least one split point
    assert all((e - s) in (16, 8, 4) for s, e in spans_eval if e <= 128)  # eval splits of full chunks are exact halves


def test_bfloat16_encoding_precomputed_equals_on_the_fly():
    llm = make_llm(gates=1.0).to(torch.bfloat16)
    ids = random_ids(9, seed=60)[None]
    ctx = random_ids(150, seed=61)
    with torch.no_grad():
        a = llm.prepare_injection(llm.encode(ctx), ids)
        b = llm.prepare_injection(llm.encode(ctx, precompute=False), ids)
    assert a.keys[0].dtype == torch.bfloat16
    assert [(n.chunk, n.level, n.index) for n in a.nodes[0]] == [(n.chunk, n.level, n.index) for n in b.nodes[0]]
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        torch.testing.assert_close(x, y, atol=2e-2, rtol=2e-2)


def test_training_draws_fresh_split_noise_each_step_and_inference_is_repeatable():
    llm = make_llm(split_noise=0.2, policy="random")
    tree = llm.encode(random_ids(256, seed=70), precompute=False)
    spans = lambda: llm.select(tree, None).spans
    llm.train()
    first, second = spans(), spans()
    assert first != second  # a training run must not see the same splits at every step
    llm.eval()
    assert spans() == spans()


def test_detach_restores_the_original_layers():
    from sharedctx.injection import InjectedDecoderLayer, detach

    base = tiny_model()
    reference = copy.deepcopy(base)
    llm = SharedLLM.from_model(base, config=SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4, policy="query"))
    assert isinstance(base.model.layers[0], InjectedDecoderLayer)
    detach(base)
    assert not any(isinstance(layer, InjectedDecoderLayer) for layer in base.model.layers)
    ids = random_ids(6)[None]
    with torch.no_grad():
        assert torch.equal(base(ids).logits, reference(ids).logits)
    assert llm.injection[0].gate.item() == 0.0


def test_shared_loads_once_per_options_and_lets_go(tmp_path):
    import gc
    import weakref

    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    from sharedctx import SharedLLM

    cfg = SharedCtxConfig(injection_layers=2, chunk_size=32, node_keep=4)
    a = SharedLLM.shared(tmp_path / "base", adapter=False, config=cfg)
    assert SharedLLM.shared(str(tmp_path / "base"), adapter=False, config=SharedCtxConfig(**cfg.to_dict())) is a
    assert SharedLLM.shared(tmp_path / "base", adapter=False, config=cfg, dtype="float32") is not a
    assert SharedLLM.shared(tmp_path / "base", adapter=False, config=SharedCtxConfig(injection_layers=1, chunk_size=32, node_keep=4)) is not a
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None  # the cache holds no strong reference
    again = SharedLLM.shared(tmp_path / "base", adapter=False, config=cfg)
    assert isinstance(again, SharedLLM) and again.config.injection_layers == 2


def test_text_tree_cache_hits_evicts_and_guards_model_identity():
    from sharedctx import TextTreeCache

    llm, other = make_llm(), make_llm(seed=1)
    cache = TextTreeCache(size=2)
    text_a, text_b, text_c = ("alpha " * 40, "beta " * 40, "gamma " * 40)
    tree = cache.tree(llm, text_a)
    assert tree.precomputed and cache.tree(llm, text_a) is tree
    assert (cache.encoded, cache.hits) == (1, 1)
    assert cache.tree(other, text_a) is not tree  # another model encodes its own tree
    cache.tree(llm, text_b)
    cache.tree(llm, text_c)  # evicts the least recently used entries
    assert len(cache) == 2 and cache.encoded == 4
    cache.tree(llm, text_a)
    assert cache.encoded == 5
    off = TextTreeCache(size=0)
    off.tree(llm, text_a)
    off.tree(llm, text_a)
    assert off.encoded == 2 and len(off) == 0
    with pytest.raises(TypeError, match="text"):
        cache.tree(llm, ["not", "text"])
    with pytest.raises(ValueError, match=">= 0"):
        TextTreeCache(size=-1)


# ---------------------------------------------------------------------- upper-layer low-rank updates
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_upper_lora_starts_as_the_base_and_acts_only_under_injection(arch):
    base = tiny_model(arch)
    reference = copy.deepcopy(base)
    llm = SharedLLM.from_model(base, config=SharedCtxConfig(injection_layers=1, chunk_size=32, node_keep=4, upper_lora_rank=4, policy="query"))
    assert len(llm.upper_lora) == 3 * 2  # q, v, o of the two layers above the bottom one
    ids, ctx = random_ids(10, seed=1)[None], random_ids(90, seed=2)
    with torch.no_grad():
        assert torch.equal(llm(ids, context=ctx).logits, reference(ids).logits)  # B = 0, gates = 0
        set_gates(llm, 1.0)
        with_ctx = llm(ids, context=ctx).logits
        without = llm(ids).logits
        for block in llm.injection:
            block.gate.zero_()
        lora_only = llm(ids, context=ctx).logits  # the cross-attention adds nothing now: only the LoRA acts
    assert torch.equal(without, reference(ids).logits)  # no context: the base model exactly
    assert (with_ctx - without).abs().max() > 1e-3
    assert (lora_only - without).abs().max() > 1e-3


def test_upper_lora_rows_without_states_run_the_base_model():
    llm = make_llm(gates=1.0, upper_lora_rank=4)
    set_gates(llm, 1.0)
    prompts = [random_ids(7, seed=4), random_ids(9, seed=5)]
    inj = llm.prepare_injection(random_ids(80, seed=6), prompts[0][None])
    from sharedctx.injection import Injection

    stacked = Injection.stack([inj, None])
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 9 - p.numel() :] = p
        mask[b, 9 - p.numel() :] = 1
    with torch.no_grad():
        out = llm(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), injection=stacked).logits[:, -1]
        torch.testing.assert_close(out[1:], llm(prompts[1][None]).logits[:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:1], llm(prompts[0][None], injection=inj).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_upper_lora_adapter_round_trips(tmp_path):
    llm = make_llm(gates=1.0, upper_lora_rank=3)
    context, prompt = llm.encode(random_ids(100, seed=4)), random_ids(9, seed=5)[None]
    llm.save_pretrained(tmp_path / "ad")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "ad" / "adapter.safetensors")))
    assert {k for k in keys if k.startswith("upper_lora.")} == {f"upper_lora.{i}.lora_{ab}" for i in range(3) for ab in "ab"}
    fresh = make_llm(upper_lora_rank=3)
    fresh.load_adapter(tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(prompt, context=context).logits, llm(prompt, context=context).logits)
    from sharedctx.errors import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="upper_lora_rank"):
        make_llm().load_adapter(tmp_path / "ad")  # a model built without the LoRA refuses the adapter
    with pytest.raises(ValueError, match="upper_lora_rank"):
        SharedCtxConfig(upper_lora_rank=-1)


def test_detach_takes_the_upper_lora_hooks_off():
    from sharedctx.injection import detach

    base = tiny_model()
    reference = copy.deepcopy(base)
    llm = SharedLLM.from_model(base, config=SharedCtxConfig(injection_layers=1, chunk_size=32, node_keep=4, upper_lora_rank=2, policy="query"))
    set_gates(llm, 1.0)
    ids = random_ids(6)[None]
    inj = llm.prepare_injection(random_ids(64, seed=3), ids)
    detach(base, llm.upper_lora)
    from sharedctx.injection import injecting

    with torch.no_grad(), injecting(inj):  # states are injected, yet the detached model is the base model
        assert torch.equal(base(ids).logits, reference(ids).logits)
