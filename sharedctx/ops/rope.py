"""Rotary position embedding (RoPE) as LLaMA-family models apply it, for chunk-level positions."""

from __future__ import annotations

import torch

__all__ = ["rotate_half", "rope_cos_sin", "apply_rope"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the LLaMA convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of RoPE at integer ``positions``.

    Args:
        positions: any shape ``P`` of integer positions.
        inv_freq: ``(D/2,)`` inverse frequencies of the model's rotary embedding.
        attention_scaling: the factor some RoPE variants fold into cos/sin (1.0 for plain RoPE).
    Returns:
        ``cos, sin`` of shape ``(*P, D)`` in float32.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., D)`` by ``cos, sin`` broadcastable to it; computed in float32, returned in x's dtype."""
    xf = x.to(torch.float32)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
