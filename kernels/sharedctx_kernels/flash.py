"""flash-attn backend: chunk rotation in torch, then ``flash_attn_varlen_func`` over the real states only.

flash-attn has no chunk-RoPE of its own, so q and k are rotated first (`sharedctx.ops.rotate_inputs`,
one rotated copy of each); ragged ``key_mask`` rows are packed into the varlen layout, so padding states
cost nothing. CUDA with float16/bfloat16 only (flash-attn's own limits); grouped-query heads are native.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from sharedctx.ops import rotate_inputs

__all__ = ["flash_attn_available", "flash_attn_chunk_cross_attention", "flash_attn_supports"]

INSTALL_HINT = "flash_attn needs CUDA, float16/bfloat16 and `pip install flash-attn --no-build-isolation`."


def flash_attn_available() -> bool:
    """True when ``flash_attn`` is installed and CUDA is present (import checked, not assumed)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA fails here
        return False
    return True


def flash_attn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def flash_attn_chunk_cross_attention(
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
    """Same contract as `sharedctx.ops.chunk_cross_attention_reference` (shapes in its docstring).

    ``q (B, H, T, D)``, ``k, v (B, Hkv, S, D)``, ``key_pos (B, S)`` or None, ``query_pos (B,)``,
    ``inv_freq (D/2,)``, ``key_mask (B, S)`` bool; returns ``(B, H, T, D)`` in q's dtype, zeros for a
    batch row without any real state. Differentiable through flash-attn's own backward.
    """
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k = rotate_inputs(q, k, key_pos, query_pos, inv_freq, attention_scaling)
    qf = q.transpose(1, 2).reshape(B * T, H, D)  # (B*T, H, D)
    kf = k.transpose(1, 2)  # (B, S, Hkv, D)
    vf = v.transpose(1, 2)
    if key_mask is None:
        kf, vf = kf.reshape(B * S, Hkv, D), vf.reshape(B * S, Hkv, D)
        seqlens_k = torch.full((B,), S, dtype=torch.int32, device=q.device)
    else:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
        kf, vf = kf[key_mask], vf[key_mask]  # (total, Hkv, D), rows in batch order
        seqlens_k = key_mask.sum(-1, dtype=torch.int32)
    cu_k = F.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)  # (B+1,)
    out = flash_attn_varlen_func(
        qf, kf.contiguous(), vf.contiguous(), cu_q, cu_k, T, S,  # S bounds every row: no host sync
        softmax_scale=scaling, causal=False,
    )
    out = out.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    if key_mask is not None:
        out = out.masked_fill(~key_mask.any(-1)[:, None, None, None], 0.0)
    return out
