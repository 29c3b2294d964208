"""Cross-attention of query tokens over injected states, with chunk-level RoPE.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (``H % Hkv == 0``), ``T`` query tokens,
``S`` injected states, ``D`` head dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope, rope_cos_sin

__all__ = ["chunk_cross_attention_reference", "eager_chunk_cross_attention", "sdpa_chunk_cross_attention", "rotate_inputs"]


def rotate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_pos: torch.Tensor | None,
    query_pos: torch.Tensor | None,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply chunk positions: keys ``(B, Hkv, S, D)`` by ``key_pos (B, S)``, queries ``(B, H, T, D)`` by ``query_pos (B,)``.

    With ``key_pos is None`` nothing is rotated (``positions="none"``).
    """
    if key_pos is None:
        return q, k
    if query_pos is None:
        raise ValueError("query_pos is required when key_pos is given")
    kc, ks = rope_cos_sin(key_pos, inv_freq, attention_scaling)  # (B, S, D)
    qc, qs = rope_cos_sin(query_pos, inv_freq, attention_scaling)  # (B, D)
    k = apply_rope(k, kc[:, None], ks[:, None])
    q = apply_rope(q, qc[:, None, None], qs[:, None, None])
    return q, k


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B,H,T,D) and k, v (B,Hkv,S,D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_mask must be (B, S)={(k.shape[0], k.shape[2])}, got {tuple(key_mask.shape)}")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def chunk_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_pos: torch.Tensor | None,
    query_pos: torch.Tensor | None,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """The float32 reference every backend is tested against.

    Args:
        q: ``(B, H, T, D)`` queries before chunk rotation.
        k: ``(B, Hkv, S, D)`` keys with their within-node rotation, before chunk rotation.
        v: ``(B, Hkv, S, D)`` values.
        key_pos: ``(B, S)`` chunk position of each state, or None for no chunk positions.
        query_pos: ``(B,)`` chunk position of the queries (the number of injected chunks).
        inv_freq: ``(D/2,)`` RoPE inverse frequencies; ``attention_scaling`` as in the model's rotary embedding.
        key_mask: ``(B, S)`` bool, True where a state is real (ragged numbers of states); None means all.
        scaling: softmax scale, default ``D ** -0.5``.
    Returns:
        ``(B, H, T, D)`` in q's dtype. A batch row without any real state gets zeros.
    """
    _check(q, k, v, key_mask)
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    q, k = rotate_inputs(q, k, key_pos, query_pos, inv_freq, attention_scaling)
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        empty = ~key_mask.any(dim=-1)
        scores = scores.masked_fill(empty[:, None, None, None], 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if key_mask is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.to(dtype)


def eager_chunk_cross_attention(q, k, v, *, key_pos, query_pos, inv_freq, attention_scaling=1.0, key_mask=None, scaling=None):
    """Matmul + float32 softmax in the input dtype (same arguments as the reference)."""
    _check(q, k, v, key_mask)
    q, k = rotate_inputs(q, k, key_pos, query_pos, inv_freq, attention_scaling)
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    empty = None
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        empty = ~key_mask.any(dim=-1)
        scores = scores.masked_fill(empty[:, None, None, None], 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def sdpa_chunk_cross_attention(q, k, v, *, key_pos, query_pos, inv_freq, attention_scaling=1.0, key_mask=None, scaling=None):
    """``torch.nn.functional.scaled_dot_product_attention`` after a separate rotation (same arguments)."""
    _check(q, k, v, key_mask)
    q, k = rotate_inputs(q, k, key_pos, query_pos, inv_freq, attention_scaling)
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    mask = None
    empty = None
    if key_mask is not None and not bool(key_mask.all()):
        empty = ~key_mask.any(dim=-1)
        mask = (key_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out
