"""Training for long windows on tiny models (issue 25): window lengths drawn per example, the ``quiet`` task (an
unrelated context, the base model's own prediction as the target) and the learned null key/value of each
cross-attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_llm, random_ids, tiny_model, word_shards

from sharedctx.injection import Injection, injecting, injection_disabled
from sharedctx.training.data import IGNORE, lm_example
from sharedctx.training.objectives import full_kl, scored_positions
from sharedctx.training.trainer import TrainConfig, Trainer

SMALL = dict(injection_layers=2, chunk_size=64, tree_height=3, node_keep=4, policy="right")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return word_shards(tmp_path_factory)


def _trainer(tmp_path, shards, *, gates=None, sharedctx=None, **kw):
    sc = {**SMALL, **(sharedctx or {})}
    cfg = dict(out_dir=str(tmp_path / "run"), sharedctx=sc, context_chunks=[1, 2], window=40, steps=4, warmup=1,
               checkpoint_every=0, progress=False, seed=5)
    cfg.update(kw)
    return Trainer(TrainConfig(**cfg), llm=make_llm(gates=gates, **sc), shards=shards)


# ---------------------------------------------------------------------- window lengths drawn per example
def test_window_is_a_length_or_a_range():
    assert TrainConfig(window=40).window_range == (40, 40)
    assert TrainConfig(window=[16, 48]).window_range == (16, 48)
    for bad in ([48, 16], [1, 8], [4, 8, 16], 1):
        with pytest.raises(ValueError, match="window"):
            TrainConfig(window=bad)


def test_a_single_window_length_draws_what_it_drew_before(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, tasks={"lm": 1.0})
    ex = trainer.sample_example("lm")
    rng = np.random.default_rng(5)  # the trainer's seed: the draws of the code before window ranges
    k = int(rng.integers(1, 3))
    ref = lm_example(shards.sample(k * 64 + 40, rng, "train"), context_tokens=k * 64)
    assert torch.equal(ex.context, ref.context) and torch.equal(ex.input_ids, ref.input_ids)
    assert trainer.rng.bit_generator.state == rng.bit_generator.state


@pytest.mark.parametrize("task", ["lm", "quiet", "distill"])
def test_window_lengths_are_drawn_per_example_in_the_range(tmp_path, shards, task):
    trainer = _trainer(tmp_path, shards, tasks={task: 1.0}, window=[8, 40], distill_top_k=4)
    lengths = [trainer.sample_example(task).input_ids.numel() for _ in range(30)]
    assert min(lengths) >= 8 and max(lengths) <= 40 and len(set(lengths)) > 5


def test_a_sampled_window_run_logs_each_steps_window_and_batches_pad(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, tasks={"lm": 1.0, "quiet": 1.0}, window=[8, 40], batch_size=2, steps=4)
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(8 <= r["window"] <= 40 and r["context"] in (64, 128) and np.isfinite(r["loss"]) for r in log)


def test_distill_checks_the_longest_window_against_the_base_models(tmp_path, shards):
    with pytest.raises(ValueError, match="window"):  # 7 x 64 + 80 = 528 > 512
        _trainer(tmp_path, shards, tasks={"distill": 1.0}, context_chunks=[7, 7], window=[8, 80])
    _trainer(tmp_path, shards, tasks={"distill": 1.0}, context_chunks=[7, 7], window=[8, 64])


# ---------------------------------------------------------------------- the quiet task
def test_draw_never_returns_the_excluded_document(shards):
    rng = np.random.default_rng(0)
    names = {shards.draw(50, rng, exclude="doc1.txt")[1] for _ in range(40)}
    assert names and "doc1.txt" not in names
    a = shards.sample(50, np.random.default_rng(1))
    b, _ = shards.draw(50, np.random.default_rng(1))
    assert np.array_equal(a, b)


def _document_of(shards, ids: torch.Tensor) -> set[str]:
    needle = ids.numpy().astype(np.int64).tobytes()
    return {d["name"] for d in shards.documents("train") if needle in np.asarray(shards.tokens(d), dtype=np.int64).tobytes()}


def test_quiet_examples_read_a_context_from_another_document(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, tasks={"quiet": 1.0})
    for _ in range(5):
        ex = trainer.sample_example("quiet")
        assert ex.task == "quiet" and ex.context.numel() in (64, 128) and ex.input_ids.numel() == 40
        assert ex.labels[0] == IGNORE and torch.equal(ex.labels[1:], ex.input_ids[1:])
        window_docs, context_docs = _document_of(shards, ex.input_ids), _document_of(shards, ex.context)
        assert len(window_docs) == 1 and len(context_docs) == 1 and window_docs != context_docs


def test_quiet_loss_is_zero_at_the_identity_and_its_target_is_the_base_on_the_window_alone(tmp_path, shards):
    identity = _trainer(tmp_path / "a", shards, tasks={"quiet": 1.0})
    loss, _ = identity.loss(identity.next_batch())
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    trainer = _trainer(tmp_path / "b", shards, gates=1.0, tasks={"quiet": 1.0})
    ex = trainer.sample_example("quiet")
    loss, labels = trainer.loss([ex])
    assert float(loss) > 1e-4
    pristine = tiny_model("llama")  # the trainer's base, never wrapped
    with torch.no_grad():
        target = pristine(input_ids=ex.input_ids[None]).logits
        inj = trainer.injection_for([ex], ex.input_ids[None], ex.labels[None])
        student = trainer.llm(ex.input_ids[None], injection=inj).logits
    torch.testing.assert_close(loss.detach(), full_kl(student, target, scored_positions(ex.labels[None])), atol=1e-5, rtol=1e-5)


def test_full_kl_is_the_kl_divergence():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ref = torch.nn.functional.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(full_kl(q, p, mask), ref)
    assert float(full_kl(p, p, mask)) == pytest.approx(0.0, abs=1e-6)


def test_quiet_steps_train_only_the_adapter_towards_the_base(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, gates=1.0, tasks={"quiet": 1.0}, lr=1e-3, gate_lr=2e-2, warmup=0)
    llm = trainer.llm.train()
    rows = [trainer.sample_example("quiet")]
    adapter = {id(p) for _, p in llm.adapter_named_parameters()}
    losses = []
    for _ in range(8):
        loss, _ = trainer.micro_step(rows)
        for name, p in llm.named_parameters():
            assert (p.grad is not None) == (id(p) in adapter), name
        trainer.opt.step()
        trainer.opt.zero_grad()
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------- null key/value
def _logits(llm, ids, context, *, inject=True):
    with torch.no_grad():
        if not inject:
            with injection_disabled():
                return llm.base(input_ids=ids).logits
        return llm(ids, context=context).logits


def test_null_kv_adapter_equals_the_base_at_initialisation():
    llm = make_llm(null_kv=True)
    pristine = tiny_model("llama")
    ids, ctx = random_ids(20, 1)[None], random_ids(96, 2)
    assert all(b.null_k is not None and float(b.null_k.abs().sum()) == 0 for b in llm.injection)
    with torch.no_grad():
        torch.testing.assert_close(llm(ids, context=ctx).logits, pristine(input_ids=ids).logits, atol=0, rtol=0)
    names = {n for n, _ in llm.adapter_named_parameters()}
    assert {"0.null_k", "0.null_v", "1.null_k", "1.null_v"} <= names
    assert not any("null" in n for n, _ in make_llm().adapter_named_parameters())  # off by default


def test_the_null_state_takes_its_share_of_the_attention():
    """With every query zero, each of the S real states and the null one get 1 / (S + 1) of the attention: with a
    zero null value the block writes S / (S + 1) of what it writes without the null state; a learned null value adds
    its own share."""
    plain, null = make_llm(gates=1.0), make_llm(null_kv=True, gates=1.0)
    ids, ctx = random_ids(12, 1)[None], random_ids(96, 2)
    inj = plain.prepare_injection([ctx], ids)
    hidden = torch.randn(1, 12, plain.injection[0].q_proj.in_features)
    rotary = plain.base.model.rotary_emb
    with torch.no_grad():
        for llm in (plain, null):
            llm.injection[0].q_proj.weight.zero_()
        a = plain.injection[0](hidden, inj, rotary.inv_freq, 1.0)
        b = null.injection[0](hidden, inj, rotary.inv_freq, 1.0)
        s = inj.n_states
        torch.testing.assert_close(b, a * s / (s + 1), atol=1e-5, rtol=1e-4)
        null.injection[0].null_v.fill_(1.0)
        c = null.injection[0](hidden, inj, rotary.inv_freq, 1.0)
        block = null.injection[0]
        share = block.gate_value() * block.o_proj(torch.ones(1, 12, block.num_heads * block.head_dim) / (s + 1))
        torch.testing.assert_close(c, b + share, atol=1e-5, rtol=1e-4)


def test_null_kv_keeps_rows_without_states_at_the_base():
    llm = make_llm(null_kv=True, gates=1.0)
    with torch.no_grad():
        for b in llm.injection:
            b.null_v.normal_()
            b.null_k.normal_()
    ids = random_ids(20, 1)[None].expand(2, -1)
    inj = Injection.stack([llm.prepare_injection([random_ids(96, 2)], ids[:1]), None])
    assert inj.key_mask is not None and not inj.key_mask[1].any()
    with torch.no_grad():
        out = llm(ids, injection=inj).logits
        base = _logits(llm, ids[:1], None, inject=False)
    torch.testing.assert_close(out[1:], base, atol=1e-5, rtol=1e-5)
    assert (out[:1] - base).abs().max() > 1e-3


def test_null_logit_does_not_depend_on_the_number_of_chunks():
    llm = make_llm(null_kv=True, gates=1.0)
    block = llm.injection[0]
    with torch.no_grad():
        block.null_k.normal_()
        block.null_v.normal_()
    ids = random_ids(12, 1)[None]
    one = llm.prepare_injection([random_ids(32, 2)], ids)
    hidden = torch.randn(1, 12, block.q_proj.in_features)
    rotary = llm.base.model.rotary_emb
    outs = []
    for n in (1, 5):  # the same states, read as if n chunks were injected: only the null logit must not move
        inj = type(one)(one.keys, one.values, torch.full_like(one.key_pos, 50), torch.tensor([n]), None)
        with torch.no_grad(), injecting(inj):
            k, v, pos, mask = block._with_null(inj, inj.keys[0], inj.values[0])
        assert pos[0, -1] == n and k.shape[2] == one.n_states + 1 and mask is None
        outs.append(block(hidden, inj, rotary.inv_freq, 1.0))
    assert not torch.allclose(outs[0], outs[1])  # the real keys' relative positions changed


def test_null_kv_adapters_round_trip_and_are_refused_by_a_model_without_them(tmp_path):
    from sharedctx.errors import AdapterMismatchError

    llm = make_llm(null_kv=True, gates=1.0)
    with torch.no_grad():
        for b in llm.injection:
            b.null_k.normal_()
    llm.save_pretrained(tmp_path / "a")
    again = make_llm(null_kv=True)
    again.load_adapter(tmp_path / "a")
    for (n, p), (_, q) in zip(llm.adapter_named_parameters(), again.adapter_named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(AdapterMismatchError, match="null_kv"):
        make_llm().load_adapter(tmp_path / "a")


# ---------------------------------------------------------------------- bf16 autocast on the CPU
def test_autocast_bf16_cpu_runs_the_step_in_bf16_and_bf16_alone_keeps_the_cpu_in_float32(tmp_path, shards):
    losses = {}
    for mode in ("none", "bf16", "bf16-cpu"):
        trainer = _trainer(tmp_path / mode, shards, gates=1.0, tasks={"lm": 1.0, "quiet": 1.0}, autocast=mode)
        with trainer._autocast():
            assert torch.is_autocast_enabled("cpu") == (mode == "bf16-cpu")
            if mode == "bf16-cpu":
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        rows = [trainer.sample_example("lm")]
        losses[mode] = float(trainer.loss(rows)[0].detach())
    assert losses["bf16"] == losses["none"]  # the CPU ignores "bf16", as every recipe recorded before
    assert losses["bf16-cpu"] != losses["none"] and losses["bf16-cpu"] == pytest.approx(losses["none"], rel=0.05)
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp16")


def test_task_scale_multiplies_that_tasks_gradients_and_not_its_logged_loss(tmp_path, shards):
    grads, losses = {}, {}
    for scale in (1.0, 4.0):
        trainer = _trainer(tmp_path / str(scale), shards, gates=1.0, tasks={"quiet": 1.0, "lm": 1.0}, task_scale={"quiet": scale})
        rows = [trainer.sample_example("quiet")]
        losses[scale], _ = trainer.micro_step(rows)
        grads[scale] = trainer.llm.injection[0].gate.grad.clone()
    assert losses[1.0] == losses[4.0]
    torch.testing.assert_close(grads[4.0], 4 * grads[1.0])
    with pytest.raises(ValueError, match="task_scale"):
        TrainConfig(tasks={"lm": 1.0}, task_scale={"quiet": 2.0})
