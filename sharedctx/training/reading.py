"""Reading diagnostics: does the adapter read *this* context, or only adapt to the kind of text?

`eval_reading` cuts ``n_windows`` stretches of ``context_tokens + window`` tokens from a held-out text and, for each,
takes a same-length stretch of an unrelated text of the same genre (the control). It reports:

- **reading gain**: the window's perplexity with the true context vs with the control context,
  ``100 * (1 - ppl_true / ppl_control)`` (positive: the true context helps more than an unrelated one). This is the
  number to grow: it separates reading from adaptation.
- **adaptation**: control vs the window alone, ``100 * (1 - ppl_control / ppl_window)``: what any same-genre text
  gives; and **context gain**: true vs the window alone.
- **copy gain**: the decoder reads the marker (``"\\nRepeat:\\n"``) followed by a span of the true context; the
  span's perplexity with the true vs the control context, ``100 * (1 - ppl_true / ppl_control)``, split by the tree
  level of the preserved node that held the span under the model's own walk (the marker is the query). With
  ``C = 1024, h = 3, keep = 32``, level 1 holds 512 tokens in 32 states (16x), level 2 256 (8x), level 3 128 (4x),
  so a copy gain that appears first at level 3 is reading at the finest resolution. The span's perplexity with no
  context (``none``) is the reference a copy has to beat.

At the identity adapter (gates 0) true, control and window-only are the same model: every gain is 0.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch

from .windows import scored_nll, window_nll, window_starts
from .objectives import marker_ids

__all__ = ["eval_reading", "READING_KEYS"]

logger = logging.getLogger(__name__)

#: top-level keys of `eval_reading`'s result
READING_KEYS = (
    "reading_gain_pct", "adaptation_pct", "context_gain_pct", "copy_gain_pct", "copy_gain_by_level_pct",
    "ppl", "copy", "settings",
)


def _gain(true_nll: float, other_nll: float) -> float:
    """``100 * (1 - ppl_true / ppl_other)`` from mean NLLs."""
    return 100.0 * (1.0 - math.exp(true_nll - other_nll))


def _span_nll(llm: Any, ids: torch.Tensor, n_scored: int, *, injection: Any = None, context: Any = None, query_length: int) -> float:
    """Summed NLL of the last ``n_scored`` tokens of ``ids (T,)``, reading ``injection`` (ready states) or ``context``."""
    out = llm(
        ids[None].to(llm.device), context=context, injection=injection,
        query_length=query_length if context is not None else None, logits_to_keep=n_scored + 1,
    )
    return scored_nll(out.logits[0, :-1], ids[-n_scored:])


@torch.no_grad()
def eval_reading(
    llm: Any,
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    control_tokens: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    context_tokens: int,
    window: int = 256,
    n_windows: int = 4,
    span: int = 64,
    score_last: int | None = None,
    marker: Sequence[int] | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Reading and copy diagnostics of ``llm`` on a held-out text (see the module docstring).

    Args:
        tokens: the held-out text's ids; ``control_tokens``: an unrelated text of the same genre (at least
            ``context_tokens`` long).
        context_tokens: context length (e.g. 2 chunks of the adapter's ``chunk_size``); window: the decoder window
            after it, scored on all its tokens but the first (or its last ``score_last``).
        span: tokens of each repeated span (fewer when the node holding it is shorter); one span per tree level
            present, per stretch, in a node drawn at random (``seed``) among that level's preserved nodes.
        marker: ids before the span (default: the tokenizer's encoding of `MARKER`).

    Returns a dict with `READING_KEYS`: gains in %, ``ppl`` (``true``, ``control``, ``window``), ``copy`` (per level
    and ``all``: ``true_ppl``, ``control_ppl``, ``none_ppl``, ``gain_pct``, ``spans``, ``tokens``, ``node_tokens``,
    ``states``), ``settings``.
    """
    from tqdm.auto import tqdm

    if context_tokens < 1 or window < 2 or span < 1:
        raise ValueError(f"need context_tokens >= 1, window >= 2 and span >= 1, got {context_tokens}, {window}, {span}")
    scored = window - 1 if score_last is None else score_last
    if not 0 < scored < window:
        raise ValueError(f"score_last must be in [1, {window - 1}], got {score_last}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    control_tokens = torch.as_tensor(np.asarray(control_tokens, dtype=np.int64))
    if marker is None:
        marker = marker_ids(llm._require_tokenizer())
    mark = torch.as_tensor(list(marker), dtype=torch.long)
    q = mark.numel()
    starts = window_starts(tokens.numel(), context_tokens + window, n_windows)
    cstarts = window_starts(control_tokens.numel(), context_tokens, n_windows)
    was_training = llm.training
    llm.eval()
    sums = {"true": 0.0, "control": 0.0, "window": 0.0}
    copy: dict[int, dict[str, float]] = {}
    try:
        for i, s in enumerate(tqdm(starts, disable=not show_progress, desc="reading")):
            rng = np.random.default_rng([seed, i])
            ctx, win = tokens[s : s + context_tokens], tokens[s + context_tokens : s + context_tokens + window]
            cctx = control_tokens[cstarts[i] : cstarts[i] + context_tokens]
            true_tree, control_tree = llm.context_tree(ctx), llm.context_tree(cctx)
            sums["true"] += window_nll(llm, win, scored, context=true_tree)
            sums["control"] += window_nll(llm, win, scored, context=control_tree)
            sums["window"] += window_nll(llm, win, scored)
            # copy: the walk with the marker as the query (span-independent), then one span per level it kept
            injection = llm.prepare_injection(true_tree, mark[None], query_length=q)
            nodes = list(injection.nodes[0]) if injection is not None else []
            for level in sorted({n.level for n in nodes}):
                at = [n for n in nodes if n.level == level]
                node = at[int(rng.integers(len(at)))]
                length = min(span, node.end - node.start)
                start = node.start + int(rng.integers(0, node.end - node.start - length + 1))
                ids = torch.cat([mark, ctx[start : start + length]])
                row = copy.setdefault(level, {"true": 0.0, "control": 0.0, "none": 0.0, "spans": 0, "tokens": 0, "node_tokens": 0, "states": 0})
                row["true"] += _span_nll(llm, ids, length, injection=injection, query_length=q)
                row["control"] += _span_nll(llm, ids, length, context=control_tree, query_length=q)
                row["none"] += _span_nll(llm, ids, length, query_length=q)
                row["spans"] += 1
                row["tokens"] += length
                row["node_tokens"] += node.end - node.start
                row["states"] += node.n_states
    finally:
        llm.train(was_training)

    n = scored * len(starts)
    mean = {k: v / n for k, v in sums.items()}
    by_level: dict[str, dict[str, Any]] = {}
    total = {"true": 0.0, "control": 0.0, "none": 0.0, "spans": 0, "tokens": 0}
    for level in sorted(copy):
        row = copy[level]
        m = {k: row[k] / row["tokens"] for k in ("true", "control", "none")}
        by_level[str(level)] = {
            "true_ppl": math.exp(m["true"]), "control_ppl": math.exp(m["control"]), "none_ppl": math.exp(m["none"]),
            "gain_pct": _gain(m["true"], m["control"]), "spans": row["spans"], "tokens": row["tokens"],
            "node_tokens": row["node_tokens"] / row["spans"], "states": row["states"] / row["spans"],
        }
        for k in total:
            total[k] += row[k]
    copy_all: dict[str, Any] = {"spans": total["spans"], "tokens": total["tokens"]}
    if total["tokens"]:
        m = {k: total[k] / total["tokens"] for k in ("true", "control", "none")}
        copy_all.update({"true_ppl": math.exp(m["true"]), "control_ppl": math.exp(m["control"]), "none_ppl": math.exp(m["none"]), "gain_pct": _gain(m["true"], m["control"])})
    return {
        "reading_gain_pct": _gain(mean["true"], mean["control"]),
        "adaptation_pct": _gain(mean["control"], mean["window"]),
        "context_gain_pct": _gain(mean["true"], mean["window"]),
        "copy_gain_pct": copy_all.get("gain_pct", float("nan")),
        "copy_gain_by_level_pct": {lv: r["gain_pct"] for lv, r in by_level.items()},
        "ppl": {k: math.exp(v) for k, v in mean.items()},
        "copy": {"by_level": by_level, "all": copy_all},
        "settings": {
            "context_tokens": context_tokens, "window": window, "scored_tokens": scored, "n_windows": len(starts), "span": span,
            "marker": mark.tolist(), "seed": seed, "starts": starts, "control_starts": cstarts, "policy": llm.config.policy,
        },
    }
