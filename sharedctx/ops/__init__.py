"""Pure-torch reference operations and the dispatcher to faster backends."""

from __future__ import annotations

from .attention import (
    chunk_cross_attention_reference,
    eager_chunk_cross_attention,
    rotate_inputs,
    sdpa_chunk_cross_attention,
)
from .dispatch import Backend, BackendUnavailableError, available_backends, register_backend, resolve_backend
from .rope import apply_rope, rope_cos_sin, rotate_half
from .sampling import sample_indices, split_point
from .scoring import cosine_scores

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "apply_rope",
    "available_backends",
    "chunk_cross_attention_reference",
    "cosine_scores",
    "eager_chunk_cross_attention",
    "register_backend",
    "resolve_backend",
    "rope_cos_sin",
    "rotate_half",
    "rotate_inputs",
    "sample_indices",
    "sdpa_chunk_cross_attention",
    "split_point",
]
