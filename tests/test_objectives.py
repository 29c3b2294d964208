"""Training objectives and reading diagnostics on tiny models: batches are built as documented, no target token reaches
the query under any objective, the top-k KL is what it says, gradients reach only the adapter, the diagnostics report
finite gains that are exactly 0 at the identity adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_llm, random_ids, tiny_model, word_shards

from sharedctx.training.data import IGNORE
from sharedctx.training.objectives import (
    TeacherTopK,
    marker_ids,
    reconstruction_example,
    scored_positions,
    teacher_inputs,
    teacher_topk,
    topk_kl,
)
from sharedctx.training.reading import READING_KEYS, eval_reading
from sharedctx.training.trainer import TrainConfig, Trainer

SMALL = dict(injection_layers=2, chunk_size=64, tree_height=3, node_keep=4, policy="right")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return word_shards(tmp_path_factory)


def _trainer(tmp_path, shards, *, policy="right", gates=None, **kw):
    cfg = dict(
        out_dir=str(tmp_path / "run"), sharedctx={**SMALL, "policy": policy}, context_chunks=[1, 2], window=40, steps=4, warmup=1,
        checkpoint_every=0, progress=False, seed=5, recon_span=6, distill_top_k=8,
    )
    cfg.update(kw)
    return Trainer(TrainConfig(**cfg), llm=make_llm(gates=gates, **{**SMALL, "policy": policy}), shards=shards)


def _node_ids(injection):
    return [(n.chunk, n.level, n.index, n.start, n.end) for n in injection.nodes[0]]


# ---------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("policy", ["right", "query", "random"])
def test_reconstruction_span_is_inside_the_context_at_a_kept_finest_node(policy):
    llm = make_llm(gates=1.0, **{**SMALL, "policy": policy}).train()
    marker = marker_ids(llm.tokenizer)
    ctx = random_ids(3 * 64 + 10, seed=4)  # a last, short chunk too
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        ex = reconstruction_example(llm, ctx, np.random.default_rng(trial), marker=marker, span=6, generator=gen)
        q = len(marker)
        start, end = ex.meta["span"]
        assert ex.task == "reconstruction" and torch.equal(ex.context, ctx)
        assert ex.input_ids[:q].tolist() == marker and (ex.labels[:q] == IGNORE).all()
        assert torch.equal(ex.labels[q:], ex.input_ids[q:]) and torch.equal(ex.input_ids[q:], ctx[start:end])
        assert 0 <= start < end <= ctx.numel() and end - start == min(6, ex.meta["node"][1] - ex.meta["node"][0])
        kept = {(n.start, n.end): n.level for n in ex.meta["selection"]}
        node = ex.meta["node"]
        assert node in kept and kept[node] == ex.meta["level"] == max(kept.values()) == 3  # level h, as documented
        assert node[0] <= start and end <= node[1]
        assert ex.query_length == q  # the query is the marker alone


def test_reconstruction_at_any_level_uses_every_level():
    llm = make_llm(gates=1.0, **SMALL).train()
    marker = marker_ids(llm.tokenizer)
    ctx = random_ids(4 * 64, seed=5)
    levels = {
        reconstruction_example(llm, ctx, np.random.default_rng(t), marker=marker, span=6, level="any").meta["level"]
        for t in range(40)
    }
    assert levels == {1, 2, 3}
    with pytest.raises(ValueError, match="finest"):
        reconstruction_example(llm, ctx, np.random.default_rng(0), marker=marker, level="coarse")


def test_the_step_injects_the_walk_the_span_was_drawn_from(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, tasks={"reconstruction": 1.0})
    trainer.llm.train()
    rows = trainer.next_batch()
    assert rows[0].task == "reconstruction"
    ids, labels = rows[0].input_ids[None], rows[0].labels[None]
    injected = trainer.injection_for(rows, ids, labels)
    assert _node_ids(injected) == [(n.chunk, n.level, n.index, n.start, n.end) for n in rows[0].meta["selection"]]


# ---------------------------------------------------------------------- no target reaches the query, under every objective
@pytest.mark.parametrize("task", ["lm", "reconstruction", "distill", "quiet", "passkey", "kv"])
def test_no_target_token_reaches_the_query_under_any_objective(tmp_path, shards, task):
    trainer = _trainer(tmp_path, shards, policy="query", gates=1.0, tasks={task: 1.0}, task_chunks=[1, 2])
    llm = trainer.llm.eval()  # deterministic walks: the same query must choose the same nodes
    ex = trainer.sample_example(task)
    ids, labels = ex.input_ids[None], ex.labels[None]
    targets = labels != IGNORE
    assert targets.any() and not targets[0, : ex.query_length].any()
    changed = ids.clone()
    changed[targets] = (ids[targets] + 7) % 250 + 3  # every target token different
    a = trainer.injection_for([ex], ids, labels)
    # the walk a step would make with the targets changed (for reconstruction: the ordinary walk from the labels)
    b = llm.prepare_injection([ex.context], changed, labels=labels)
    assert _node_ids(a) == _node_ids(b)
    assert torch.equal(llm.query_keys(ids, [ex.query_length]), llm.query_keys(changed, [ex.query_length]))
    if task == "reconstruction":
        assert ex.query_length == len(trainer.marker)
    loss, _ = trainer.loss([ex])
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------- distillation
def test_distill_teacher_reads_context_then_window_with_the_base_model(tmp_path, shards):
    trainer = _trainer(tmp_path, shards, gates=1.0, tasks={"distill": 1.0})
    pristine = tiny_model("llama")  # the same weights as the trainer's base, never wrapped
    ex = trainer.sample_example("distill")
    assert ex.task == "distill" and ex.context.numel() in (64, 128) and ex.input_ids.numel() == 40
    assert torch.equal(teacher_inputs(ex), torch.cat([ex.context, ex.input_ids]))
    assert (ex.labels[0] == IGNORE) and torch.equal(ex.labels[1:], ex.input_ids[1:])
    teacher = teacher_topk(trainer.llm, ex, k=8)
    with torch.no_grad():
        logits = pristine(input_ids=teacher_inputs(ex)[None]).logits[:, -40:]
    ref = TeacherTopK.from_logits(logits, 8)
    assert teacher.indices.shape == (1, 40, 8)
    torch.testing.assert_close(teacher.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.log_tail, ref.log_tail, atol=1e-5, rtol=1e-5)
    # probabilities: top-k plus tail is the whole distribution
    torch.testing.assert_close(teacher.logprobs.exp().sum(-1) + teacher.log_tail.exp(), torch.ones(1, 40), atol=1e-5, rtol=1e-5)


def test_distill_refuses_a_teacher_past_the_base_models_window(tmp_path, shards):
    with pytest.raises(ValueError, match="window"):
        _trainer(tmp_path, shards, tasks={"distill": 1.0}, context_chunks=[8, 8], window=40)  # 552 > 512 tokens


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
def test_topk_kl_is_zero_for_equal_logits_and_bounded_by_the_full_kl(tail):
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(2, 5, 50, generator=g) * 3
    student_logits = torch.randn(2, 5, 50, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    teacher = TeacherTopK.from_logits(teacher_logits, 8)
    assert float(topk_kl(teacher_logits, teacher, mask, tail=tail)) == pytest.approx(0.0, abs=1e-6)
    kl = float(topk_kl(student_logits, teacher, mask, tail=tail))
    assert kl > 0.01
    full = torch.nn.functional.kl_div(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1), log_target=True, reduction="none").sum(-1).mean()
    if tail == "bucket":  # a coarsening of both distributions: never above the full KL, equal to it with k = V
        assert kl <= float(full) + 1e-5
        whole = TeacherTopK.from_logits(teacher_logits, 50)
        assert float(topk_kl(student_logits, whole, mask, tail=tail)) == pytest.approx(float(full), rel=1e-4)
    # masked positions do not count
    only_first = torch.zeros_like(mask)
    only_first[:, 0] = True
    per_first = topk_kl(student_logits[:, :1], TeacherTopK(teacher.indices[:, :1], teacher.logprobs[:, :1], teacher.log_tail[:, :1]), mask[:, :1], tail=tail)
    torch.testing.assert_close(topk_kl(student_logits, teacher, only_first, tail=tail), per_first)


def test_scored_positions_shift_the_labels():
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE], [IGNORE, IGNORE, IGNORE, 9]])
    assert scored_positions(labels).tolist() == [[True, True, False, False], [False, False, True, False]]


@pytest.mark.parametrize("task", ["distill", "reconstruction"])
def test_gradients_reach_only_adapter_parameters(tmp_path, shards, task):
    trainer = _trainer(tmp_path, shards, gates=1.0, tasks={task: 1.0})
    llm = trainer.llm.train()
    adapter = {id(p) for _, p in llm.adapter_named_parameters()}
    loss, _ = trainer.loss(trainer.next_batch())
    loss.backward()
    for name, p in llm.named_parameters():
        if id(p) in adapter:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(float(p.grad.abs().sum()) > 0 for _, p in llm.adapter_named_parameters())


def test_mixed_objectives_train_and_log_reading_diagnostics(tmp_path, shards):
    trainer = _trainer(
        tmp_path, shards, tasks={"lm": 1.0, "reconstruction": 1.0, "distill": 1.0}, steps=4, eval_every=2, eval_text="held.txt",
        eval_control="doc0.txt", eval_windows=1, eval_context_chunks=1, eval_window=24, eval_span=6,
    )
    summary = trainer.fit()
    assert summary["steps"] == 4 and set(summary["reading"]) >= {"reading_gain_pct", "copy_gain_pct"}
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    assert [r["step"] for r in log if "reading" in r] == [2, 4]
    assert set(log[1]["reading"]) >= {"reading_gain_pct", "adaptation_pct", "copy_gain_pct", "copy_gain_by_level_pct", "ppl"}
    reading = [json.loads(line) for line in (tmp_path / "run" / "reading_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reading] == [2, 4] and set(READING_KEYS) <= set(reading[0])


def test_reading_evaluation_does_not_change_training(tmp_path, shards):
    a = _trainer(tmp_path / "a", shards, tasks={"lm": 1.0, "reconstruction": 1.0}, steps=3)
    a.fit()
    b = _trainer(tmp_path / "b", shards, tasks={"lm": 1.0, "reconstruction": 1.0}, steps=3, eval_every=1, eval_text="held.txt",
                 eval_control="doc0.txt", eval_windows=1, eval_context_chunks=1, eval_window=24, eval_span=6)
    b.fit()
    for (n, p), (_, q) in zip(a.llm.adapter_named_parameters(), b.llm.adapter_named_parameters()):
        assert torch.equal(p, q), n


def test_reading_config_is_validated():
    with pytest.raises(ValueError, match="eval_text"):
        TrainConfig(eval_every=10)
    with pytest.raises(ValueError, match="recon_level"):
        TrainConfig(recon_level="coarse")
    with pytest.raises(ValueError, match="distill_tail"):
        TrainConfig(distill_tail="drop")
    TrainConfig(tasks={"lm": 1, "reconstruction": 1, "distill": 1})


# ---------------------------------------------------------------------- reading diagnostics
def test_reading_diagnostics_are_zero_at_the_identity_adapter():
    llm = make_llm(**SMALL)  # gates 0: true, control and window alone are the same model
    text, control = random_ids(600, seed=1), random_ids(400, seed=2)
    r = eval_reading(llm, text, control, context_tokens=128, window=32, n_windows=2, span=6)
    assert set(READING_KEYS) <= set(r)
    for key in ("reading_gain_pct", "adaptation_pct", "context_gain_pct", "copy_gain_pct"):
        assert r[key] == pytest.approx(0.0, abs=1e-9), key
    assert r["ppl"]["true"] == r["ppl"]["control"] == r["ppl"]["window"]
    assert set(r["copy"]["by_level"]) == {"1", "2", "3"}
    for level, row in r["copy"]["by_level"].items():
        assert row["gain_pct"] == pytest.approx(0.0, abs=1e-9) and row["true_ppl"] == row["control_ppl"] == row["none_ppl"]
        assert row["spans"] == 2 and row["node_tokens"] == 64 / 2 ** int(level) and row["states"] == 4


def test_reading_diagnostics_with_a_reading_adapter_are_finite_and_deterministic():
    llm = make_llm(gates=1.0, **SMALL)
    text, control = random_ids(600, seed=1), random_ids(400, seed=2)
    r = eval_reading(llm, text, control, context_tokens=128, window=32, n_windows=2, span=6, score_last=16)
    values = [r["reading_gain_pct"], r["adaptation_pct"], r["copy_gain_pct"], *r["copy_gain_by_level_pct"].values(), *r["ppl"].values()]
    assert all(np.isfinite(v) for v in values)
    assert r["ppl"]["true"] != r["ppl"]["control"]  # the context is read
    assert r["settings"]["scored_tokens"] == 16 and r["copy"]["all"]["tokens"] == 2 * 3 * 6
    assert eval_reading(llm, text, control, context_tokens=128, window=32, n_windows=2, span=6, score_last=16) == r
    with pytest.raises(ValueError, match="score_last"):
        eval_reading(llm, text, control, context_tokens=128, window=32, score_last=32)

