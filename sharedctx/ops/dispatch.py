"""Choose a cross-attention backend (registered kernels first, then SDPA, then eager) and a fused K/V
sampler for node encoding (a registered kernel, else None: the encoder gathers with ``index_select``).

Optional distributions (``sharedctx-kernels``) register backends through the entry-point group
``sharedctx.attention_backends``: each entry point names a callable that receives `register_backend`
(and may call `register_sampler`). The core never imports them directly.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

from ..errors import BackendUnavailableError
from .attention import eager_chunk_cross_attention, sdpa_chunk_cross_attention

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Sampler",
    "register_backend",
    "register_sampler",
    "resolve_backend",
    "resolve_sampler",
    "available_backends",
]

logger = logging.getLogger(__name__)

AUTO_ORDER = ("triton", "flash_attn", "sdpa", "eager")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    #: ``supports(device, dtype) -> bool``
    supports: Callable[[torch.device, torch.dtype], bool]
    install_hint: str = ""


@dataclass(frozen=True)
class Sampler:
    """A fused K/V sampler: ``fn(k, v, *, keep, align, out_k, out_v)`` gathers ``keep`` stride-aligned states of
    ``k, v (B, Hkv, L, D)`` straight into ``out_k, out_v (B, Hkv, keep, D)`` (see `sharedctx.ops.sampling`)."""

    name: str
    fn: Callable[..., object]
    #: ``supports(device, dtype) -> bool``
    supports: Callable[[torch.device, torch.dtype], bool]


_REGISTRY: dict[str, Backend] = {}
_SAMPLERS: dict[str, Sampler] = {}
_LOCK = threading.Lock()
_PLUGINS_LOADED = False
_ANNOUNCED: set[tuple[str, str, str]] = set()


def register_backend(backend: Backend) -> None:
    """Add or replace a backend by name."""
    with _LOCK:
        _REGISTRY[backend.name] = backend


register_backend(Backend("eager", eager_chunk_cross_attention, lambda device, dtype: True))
register_backend(Backend("sdpa", sdpa_chunk_cross_attention, lambda device, dtype: True))


def register_sampler(sampler: Sampler) -> None:
    """Add or replace a fused K/V sampler by name."""
    with _LOCK:
        _SAMPLERS[sampler.name] = sampler


def resolve_sampler(device: torch.device, dtype: torch.dtype) -> Callable[..., object] | None:
    """The first registered fused sampler that runs on ``device``/``dtype``, or None (gather in PyTorch)."""
    _load_plugins()
    for sampler in list(_SAMPLERS.values()):
        if sampler.supports(device, dtype):
            key = ("sampler:" + sampler.name, str(device.type), str(dtype))
            if key not in _ANNOUNCED:
                _ANNOUNCED.add(key)
                logger.info("sharedctx node sampling: fused %s gather (%s, %s)", sampler.name, device.type, dtype)
            return sampler.fn
    return None


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for entry in metadata.entry_points(group="sharedctx.attention_backends"):
        try:
            entry.load()(register_backend)
        except Exception as exc:  # a broken optional plugin must not break the core
            logger.warning("attention backend plugin %s failed to load: %s", entry.name, exc)


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    _load_plugins()
    return [name for name, b in _REGISTRY.items() if b.supports(device, dtype)]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend to use: ``auto`` picks the first of triton, flash_attn, sdpa, eager that runs here.

    An explicitly named backend that is missing or cannot run on ``device``/``dtype`` raises
    `BackendUnavailableError` instead of falling back silently.
    """
    _load_plugins()
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = _REGISTRY.get(candidate)
            if backend is not None and backend.supports(device, dtype):
                key = (candidate, str(device.type), str(dtype))
                if key not in _ANNOUNCED:
                    _ANNOUNCED.add(key)
                    logger.info("sharedctx cross-attention backend: %s (%s, %s)", candidate, device.type, dtype)
                return backend
        raise BackendUnavailableError("no attention backend available")  # eager always is; defensive
    backend = _REGISTRY.get(name)
    if backend is None:
        hint = " Install sharedctx-kernels for 'triton', flash-attn for 'flash_attn'." if name in AUTO_ORDER else ""
        raise BackendUnavailableError(
            f"attention backend {name!r} is not installed; available: {sorted(_REGISTRY)}.{hint}"
        )
    if not backend.supports(device, dtype):
        raise BackendUnavailableError(
            f"attention backend {name!r} cannot run on {device.type} with {dtype}. {backend.install_hint}".strip()
        )
    return backend
