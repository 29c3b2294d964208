"""Tree splitting and the down-sampling of a node's states."""

from __future__ import annotations

import math

import torch

__all__ = ["sample_indices", "split_point"]


def sample_indices(length: int, keep: int, align: str = "end") -> list[int]:
    """Indices of the ``keep`` states kept from a node of ``length`` states (uniform strides).

    ``align="end"`` keeps ``floor((j+1) * length / keep) - 1``, the state that ends stride window ``j``
    (a causal state has then seen its whole window); ``align="start"`` keeps ``floor(j * length / keep)``.
    A node no longer than ``keep`` keeps every state.
    """
    if length < 1:
        raise ValueError(f"a node has at least one token, got length={length}")
    if keep >= length:
        return list(range(length))
    if align == "end":
        return [((j + 1) * length) // keep - 1 for j in range(keep)]
    if align == "start":
        return [(j * length) // keep for j in range(keep)]
    raise ValueError(f"align must be 'end' or 'start', got {align!r}")


def split_point(length: int, noise_std: float = 0.0, generator: torch.Generator | None = None) -> int:
    """Where a node of ``length`` tokens is split: ``floor(length/2 - eps)``, ``eps ~ N(0, (noise_std*length)^2)``.

    The result is clamped to ``[1, length-1]`` so both children hold at least one token.
    """
    if length < 2:
        raise ValueError(f"cannot split a node of {length} token(s)")
    eps = 0.0
    if noise_std > 0.0:
        eps = float(torch.randn((), generator=generator)) * noise_std * length
    b = math.floor(length / 2 - eps)
    return min(max(b, 1), length - 1)
