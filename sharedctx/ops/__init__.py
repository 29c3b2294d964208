"""Pure-torch reference operations and the dispatcher to faster backends."""

from __future__ import annotations

from .attention import (
    chunk_cross_attention_reference,
    eager_chunk_cross_attention,
    rotate_inputs,
    sdpa_chunk_cross_attention,
)
from .dispatch import (
    Backend,
    BackendUnavailableError,
    Sampler,
    available_backends,
    register_backend,
    register_sampler,
    resolve_backend,
    resolve_sampler,
)
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
    "register_sampler",
    "Sampler",
    "resolve_backend",
    "resolve_sampler",
    "rope_cos_sin",
    "rotate_half",
    "rotate_inputs",
    "sample_indices",
    "sdpa_chunk_cross_attention",
    "split_point",
]
