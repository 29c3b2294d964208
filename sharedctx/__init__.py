"""sharedctx: long contexts for LLaMA-family models through multi-grained self-injection (SharedLLM).

The names below are what an application needs; everything else is importable from its module
(`sharedctx.errors`, `sharedctx.index`, `sharedctx.training`, ...). They load on first use, so
``import sharedctx`` is cheap (torch and transformers load with the first model or tree).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "SharedLLM",
    "SharedCtxConfig",
    "ContextTree",
    "TextTreeCache",
    "Completion",
    "ContextIndex",
    "Answer",
    "Citation",
    "TreeStore",
    "SharedCtxError",
    "__version__",
]

#: public name -> module it lives in; also the errors users most often catch, importable but not in __all__
_LAZY = {
    "SharedLLM": ".model",
    "Completion": ".stats",
    "SharedCtxConfig": ".config",
    "ContextTree": ".tree",
    "TextTreeCache": ".contexts",
    "ContextIndex": ".index",
    "Answer": ".index",
    "Citation": ".index",
    "TreeStore": ".index.store",
    "Injection": ".injection",
    "SharedCtxError": ".errors",
    "AdapterMismatchError": ".errors",
    "ContextMismatchError": ".errors",
    "PromptTooLongError": ".errors",
    "InputError": ".errors",
}

if TYPE_CHECKING:
    from .config import SharedCtxConfig
    from .contexts import TextTreeCache
    from .errors import (  # noqa: F401
        AdapterMismatchError,
        ContextMismatchError,
        InputError,
        PromptTooLongError,
        SharedCtxError,
    )
    from .index import Answer, Citation, ContextIndex
    from .index.store import TreeStore
    from .injection import Injection  # noqa: F401
    from .model import SharedLLM
    from .stats import Completion
    from .tree import ContextTree


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sharedctx' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
