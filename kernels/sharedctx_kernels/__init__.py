"""sharedctx-kernels: Triton and flash-attn backends for sharedctx's chunk-RoPE cross-attention.

The core finds these through the entry-point group ``sharedctx.attention_backends``:
``triton = sharedctx_kernels:register`` and ``flash_attn = sharedctx_kernels:register_flash_attn``.
Importing this package does not import triton or flash_attn; the kernels load on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any, Callable

import torch

__all__ = [
    "register",
    "register_flash_attn",
    "register_triton",
    "sample_kv",
    "sample_kv_reference",
    "triton_chunk_cross_attention",
    "triton_supports",
]

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

TRITON_HINT = "The triton backend needs CUDA (or TRITON_INTERPRET=1 on the CPU, for tests) and `pip install triton`."
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpret() -> bool:
    """Whether the Triton kernels run in the CPU interpreter (decided when they are first imported)."""
    from . import attention

    return attention.INTERPRET


def triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """True on CUDA with compiled kernels, and on the CPU when the kernels run in Triton's interpreter."""
    if dtype not in _TRITON_DTYPES or not _triton_installed():
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1" and _triton_interpret()
    if device.type != "cuda" or not torch.cuda.is_available() or _triton_interpret():
        return False
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return True


def triton_chunk_cross_attention(q, k, v, **kwargs: Any) -> torch.Tensor:
    """See `sharedctx_kernels.attention.triton_chunk_cross_attention` (imports triton on first call)."""
    from .attention import triton_chunk_cross_attention as fn

    return fn(q, k, v, **kwargs)


def sample_kv(k, v=None, **kwargs: Any):
    """See `sharedctx_kernels.sampling.sample_kv` (imports triton on first call)."""
    from .sampling import sample_kv as fn

    return fn(k, v, **kwargs)


def sample_kv_reference(k, v=None, **kwargs: Any):
    """See `sharedctx_kernels.sampling.sample_kv_reference`."""
    from .sampling import sample_kv_reference as fn

    return fn(k, v, **kwargs)


def register_triton(register_backend: Callable) -> None:
    """Register the ``triton`` backend with sharedctx's dispatcher (when triton is installed)."""
    from sharedctx.ops import Backend

    if not _triton_installed():
        logger.info("sharedctx-kernels: triton is not installed; the triton backend is not registered")
        return
    register_backend(Backend("triton", triton_chunk_cross_attention, triton_supports, TRITON_HINT))
    from sharedctx.ops import Sampler, register_sampler

    # the fused gather pays off only on a GPU (under Triton's CPU interpreter it is a test vehicle, not a speed-up)
    register_sampler(Sampler("triton", sample_kv, lambda device, dtype: device.type == "cuda"))


def register_flash_attn(register_backend: Callable) -> None:
    """Register the ``flash_attn`` backend when flash_attn imports and CUDA is present."""
    from sharedctx.ops import Backend

    from .flash import INSTALL_HINT, flash_attn_available, flash_attn_chunk_cross_attention, flash_attn_supports

    if flash_attn_available():
        register_backend(Backend("flash_attn", flash_attn_chunk_cross_attention, flash_attn_supports, INSTALL_HINT))


def register(register_backend: Callable) -> None:
    """Entry point of ``sharedctx.attention_backends``: registers every backend that can run here."""
    register_triton(register_backend)
    register_flash_attn(register_backend)
