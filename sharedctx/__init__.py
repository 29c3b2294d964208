"""sharedctx: long contexts for LLaMA-family models through multi-grained self-injection (SharedLLM)."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import SharedCtxConfig  # noqa: E402
from .errors import AdapterMismatchError, ContextMismatchError, InputError, PromptTooLongError, SharedCtxError  # noqa: E402
from .index import Answer, Citation, ContextIndex  # noqa: E402
from .injection import Injection  # noqa: E402
from .model import Completion, SharedLLM, TextTreeCache  # noqa: E402
from .store import TreeStore  # noqa: E402
from .tree import ContextTree  # noqa: E402

__all__ = [
    "AdapterMismatchError",
    "Answer",
    "Citation",
    "Completion",
    "ContextIndex",
    "ContextMismatchError",
    "ContextTree",
    "Injection",
    "InputError",
    "PromptTooLongError",
    "SharedCtxConfig",
    "SharedCtxError",
    "SharedLLM",
    "TextTreeCache",
    "TreeStore",
    "__version__",
]
