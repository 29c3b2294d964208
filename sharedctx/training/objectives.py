"""Training objectives beyond LM continuation: reconstruction of a context span, and distillation from the base
model reading the whole text in full attention.

**Reconstruction** (``reconstruction`` task). The window is a fixed marker (``"\\nRepeat:\\n"`` by default) followed
by a span of the context; only the span is scored. The span is *drawn where the walk keeps fine nodes*: the builder
runs the model's own walk (its policy, its split noise, the trainer's generator) over the context with the marker
as the query, picks a preserved node at the finest level (level ``h``; or any level with ``level="any"``), and
draws the span inside it. The same `Selection` is injected in the training step, so the target always lies in a
node the decoder can read at the finest compression the tree offers. We draw rather than steer (choose a span, then
force the walk to keep it fine) because drawing uses the unmodified walker under every policy: the distribution of
levels, split points and chunk positions seen in training is the one inference sees, and no policy override is
needed. The query is the marker alone, computed before the span is appended, so no target token can reach it.

**Quiet** (``quiet`` task). The context is unrelated to the window (another training document) and the target is
the frozen base model's own next-token distribution on the window alone (the same model with injection disabled):
the full KL(base || student) on the window's scored positions. It teaches the adapter to stay out of the way when
the context has nothing for the window, the harm measured at long windows (an unrelated context 40 % worse than the
window alone). The base pass costs one no-grad forward over the window.

**Distillation** (``distill`` task). The teacher is the frozen base model (the same `SharedLLM` with injection
disabled) reading ``[context ; window]`` in full attention, which must fit in its trained window; the student is the
model reading the window with the context injected. The loss is KL(teacher || student) on the window's scored
positions, from the teacher's top-k log-probabilities (computed on the fly, or read from shards precomputed by
`teacher.precompute_teacher`). With ``tail="bucket"`` (default) the teacher's remaining mass is one explicit extra
outcome: the KL between the two distributions coarsened to ``k + 1`` outcomes (the top-k tokens and "anything else"),
a lower bound of the full KL that is zero exactly when the student gives the top-k tokens the teacher's probabilities. With ``tail="renormalise"`` both distributions are
renormalised over the top-k tokens and the tail is dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..injection import injection_disabled
from .data import IGNORE, Example, lm_example

__all__ = [
    "MARKER",
    "TAILS",
    "marker_ids",
    "reconstruction_example",
    "distill_example",
    "quiet_example",
    "base_logits",
    "full_kl",
    "teacher_inputs",
    "TeacherTopK",
    "teacher_topk",
    "topk_kl",
    "scored_positions",
]

logger = logging.getLogger(__name__)

#: the text before a repeated span (reconstruction training and the copy diagnostic)
MARKER = "\nRepeat:\n"
TAILS = ("bucket", "renormalise")


def marker_ids(tokenizer: Any, marker: str = MARKER) -> list[int]:
    """Token ids of the reconstruction marker (no special tokens)."""
    ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"the marker {marker!r} encodes to no tokens; choose a non-empty marker")
    return ids


# ---------------------------------------------------------------------- reconstruction
def reconstruction_example(
    llm: Any,
    context: Sequence[int] | np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    *,
    marker: Sequence[int],
    span: int = 64,
    level: str = "finest",
    generator: torch.Generator | None = None,
) -> Example:
    """The window repeats a span of ``context`` after ``marker``; labels only on the span.

    The walk (``llm.select`` under the model's policy, in the model's current train/eval mode, with ``generator``
    for split noise) runs over the context with the marker as the query; the span (``span`` tokens, fewer when the
    node is shorter) is drawn inside a preserved node at the finest level present (``level="finest"``) or at any
    level (``"any"``). ``meta`` holds the `Selection` to inject (``selection``), the node's level and span
    (``level``, ``node``) and the span's place in the context (``span``: ``(start, end)``).
    """
    if level not in ("finest", "any"):
        raise ValueError(f"reconstruction level must be 'finest' or 'any', got {level!r}")
    if span < 1:
        raise ValueError(f"the reconstruction span must have at least 1 token, got {span}")
    ctx = torch.as_tensor(np.asarray(context, dtype=np.int64)).reshape(-1)
    mark = torch.as_tensor(list(marker), dtype=torch.long)
    tree = llm.context_tree(ctx)
    query = mark[None].to(llm.device)  # the query is the marker alone: the span does not exist yet
    qkey = llm.query_keys(query, [mark.numel()])[0] if llm.config.policy == "query" else None
    qtext = llm.tokenizer.decode(mark.tolist(), skip_special_tokens=True) if llm.config.policy == "lexical" else None
    selection = llm.select(tree, qkey, generator=generator, query_text=qtext)
    nodes = list(selection)
    if level == "finest":
        finest = max(n.level for n in nodes)
        nodes = [n for n in nodes if n.level == finest]
    node = nodes[int(rng.integers(len(nodes)))]
    length = min(span, node.end - node.start)
    start = node.start + int(rng.integers(0, node.end - node.start - length + 1))
    target = ctx[start : start + length]
    ids = torch.cat([mark, target])
    labels = torch.full_like(ids, IGNORE)
    labels[mark.numel() :] = target
    meta = {"selection": selection, "level": node.level, "node": (node.start, node.end), "span": (start, start + length)}
    return Example(ctx, ids, labels, task="reconstruction", meta=meta)


# ---------------------------------------------------------------------- distillation
def distill_example(tokens: Sequence[int] | np.ndarray, *, context_tokens: int) -> Example:
    """Like `lm_example` (the context to the tree, the rest the window, scored but its first token), for the
    ``distill`` task: the teacher reads `teacher_inputs` of it."""
    ex = lm_example(tokens, context_tokens=context_tokens)
    ex.task = "distill"
    return ex


def quiet_example(window: Sequence[int] | np.ndarray, context: Sequence[int] | np.ndarray) -> Example:
    """The ``quiet`` task: ``context`` (from another document) to the tree, ``window`` to the decoder, scored on all
    of it but its first token against the base model reading the window alone (`base_logits`)."""
    ex = lm_example(np.concatenate([np.asarray(context, dtype=np.int64), np.asarray(window, dtype=np.int64)]),
                    context_tokens=len(context))
    ex.task = "quiet"
    return ex


@torch.no_grad()
def base_logits(llm: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen base model (injection disabled, no dropout) on ``ids (B, T)`` alone: logits ``(B, T, V)``."""
    was_training = llm.base.training
    llm.base.eval()
    try:
        with injection_disabled():
            return llm.base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        llm.base.train(was_training)


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask``-ed positions ``(B, T)`` of the full-vocabulary KL(teacher || student), in float32."""
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    per = (logp.exp() * (logp - logq)).sum(-1)
    mask = mask.to(per.device)
    n = mask.sum()
    return (per * mask).sum() / n if n else per.sum() * 0.0


def teacher_inputs(example: Example) -> torch.Tensor:
    """What the teacher reads: ``[context ; window]`` ``(N + T,)``."""
    return torch.cat([example.context, example.input_ids])


@dataclass
class TeacherTopK:
    """The teacher's top-k next-token log-probabilities at each window position.

    Attributes:
        indices: ``(B, T, k)`` token ids, most probable first.
        logprobs: ``(B, T, k)`` their log-probabilities under the full softmax (float32).
        log_tail: ``(B, T)`` log of the remaining mass ``1 - sum(exp(logprobs))`` (``-inf`` when none is left).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor

    @staticmethod
    def from_logits(logits: torch.Tensor, k: int) -> TeacherTopK:
        """From full logits ``(B, T, V)``."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        rest = logp.scatter(-1, idx, float("-inf"))
        return TeacherTopK(idx, top, torch.logsumexp(rest, dim=-1))

    @staticmethod
    def stack(rows: Sequence[TeacherTopK], length: int) -> TeacherTopK:
        """Rows of ``(1, T_i, k)`` right-padded to ``(B, length, k)`` (padding positions are never scored)."""
        k = rows[0].indices.shape[-1]
        dev = rows[0].logprobs.device
        idx = torch.zeros(len(rows), length, k, dtype=torch.long, device=dev)
        lp = torch.full((len(rows), length, k), -math.log(k), device=dev)
        tail = torch.full((len(rows), length), float("-inf"), device=dev)
        for b, r in enumerate(rows):
            t = r.indices.shape[1]
            idx[b, :t], lp[b, :t], tail[b, :t] = r.indices[0], r.logprobs[0], r.log_tail[0]
        return TeacherTopK(idx, lp, tail)


@torch.no_grad()
def teacher_topk(llm: Any, example: Example, k: int = 32) -> TeacherTopK:
    """The frozen base model (injection disabled) reading ``[context ; window]`` in full attention: its top-k
    next-token log-probabilities at each of the window's ``T`` positions, ``(1, T, k)``.

    Raises ValueError when ``context + window`` exceeds the base model's trained window (full attention past it
    is not a teacher worth copying: DESIGN.md section 6)."""
    ids = teacher_inputs(example)
    t = example.input_ids.numel()
    if llm.max_positions and ids.numel() > llm.max_positions:
        raise ValueError(
            f"the distillation teacher reads context + window = {ids.numel()} tokens, past the base model's "
            f"{llm.max_positions}-token window; use fewer context chunks or a shorter window"
        )
    was_training = llm.base.training
    llm.base.eval()  # no dropout in the teacher
    try:
        with injection_disabled():
            out = llm.base(input_ids=ids[None].to(llm.device), use_cache=False, logits_to_keep=t)
    finally:
        llm.base.train(was_training)
    return TeacherTopK.from_logits(out.logits, k)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: position ``t`` is scored when its logits predict a labelled token ``labels[:, t + 1]``."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def topk_kl(student_logits: torch.Tensor, teacher: TeacherTopK, mask: torch.Tensor, *, tail: str = "bucket") -> torch.Tensor:
    """Mean over ``mask``-ed positions of KL(teacher || student) from the teacher's top-k.

    Args:
        student_logits: ``(B, T, V)``.
        teacher: `TeacherTopK` of ``(B, T, k)``.
        mask: ``(B, T)`` bool, the positions to score (see `scored_positions`).
        tail: ``bucket``: the teacher's remaining mass is one more outcome, matched by the student's mass outside
            the teacher's top-k; ``renormalise``: both distributions renormalised over the top-k.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    logq_all = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    logq = logq_all.gather(-1, teacher.indices)  # (B, T, k)
    logp = teacher.logprobs
    if tail == "renormalise":
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        logq = logq - torch.logsumexp(logq, dim=-1, keepdim=True)
        per = (logp.exp() * (logp - logq)).sum(-1)
    else:
        logq_tail = torch.logsumexp(logq_all.scatter(-1, teacher.indices, float("-inf")), dim=-1)  # (B, T)
        p_tail = teacher.log_tail.exp()
        tail_term = torch.where(p_tail > 0, p_tail * (teacher.log_tail - logq_tail), torch.zeros_like(p_tail))
        per = (logp.exp() * (logp - logq)).sum(-1) + tail_term
    mask = mask.to(per.device)
    n = mask.sum()
    if n == 0:
        return per.sum() * 0.0
    return (per * mask).sum() / n
