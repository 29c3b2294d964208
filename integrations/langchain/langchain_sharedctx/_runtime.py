"""Loading SharedLLM models once per process, encoding contexts once per text, and chat prompts as token ids.

Only sharedctx's public API is used here; sharedctx (and with it torch) is imported on first use, so importing
``langchain_sharedctx`` stays cheap.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["load_llm", "ContextCache", "message_text", "context_text", "is_index"]

logger = logging.getLogger(__name__)


def _sharedctx():
    try:
        import sharedctx
    except ImportError as exc:  # pragma: no cover - sharedctx is a declared dependency
        raise ImportError("langchain-sharedctx needs sharedctx: `pip install sharedctx`") from exc
    return sharedctx


def load_llm(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    """``SharedLLM.shared``: one model per set of options, shared by everything alive in this process."""
    return _sharedctx().SharedLLM.shared(model, adapter=adapter, device=device, dtype=dtype)


def is_index(obj: Any) -> bool:
    """Whether ``obj`` is a `sharedctx.index.ContextIndex` (checked without importing sharedctx when it is not loaded)."""
    import sys

    module = sys.modules.get("sharedctx.index")
    return module is not None and isinstance(obj, module.ContextIndex)


def context_text(context: Any) -> str | None:
    """The text of a context given as a string, a Document, or a sequence of strings / Documents; else None."""
    if isinstance(context, str):
        return context
    if hasattr(context, "page_content"):
        return str(context.page_content)
    if isinstance(context, (list, tuple)) and all(isinstance(c, str) or hasattr(c, "page_content") for c in context):
        return "\n\n".join(c if isinstance(c, str) else str(c.page_content) for c in context)
    return None


class ContextCache:
    """Context trees encoded once per (model, text): a small thread-safe LRU.

    Text contexts are encoded with ``precompute=True`` (every node of every chunk), so asking many questions
    about one bound context encodes it once.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._cache: Any = None  # a sharedctx.TextTreeCache, made on first use (importing sharedctx)

    @property
    def encoded(self) -> int:
        """How many texts were encoded (cache misses)."""
        return self._cache.encoded if self._cache is not None else 0

    def tree(self, llm: Any, context: Any) -> Any:
        """A `ContextTree` for ``context`` (text, Documents or a tree); None for None; TypeError otherwise."""
        if context is None:
            return None
        sharedctx = _sharedctx()
        if isinstance(context, sharedctx.ContextTree):
            return context
        text = context_text(context)
        if text is None:
            raise TypeError(
                f"cannot use a {type(context).__name__} as context: pass text, a Document, a list of Documents "
                "or strings, a sharedctx.ContextTree (from `llm.encode(text)`) or a sharedctx.index.ContextIndex"
            )
        if not text:
            return None
        if self._cache is None:
            self._cache = sharedctx.TextTreeCache(self.size)
        self._cache.size = self.size
        return self._cache.tree(llm, text)


def message_text(content: Any) -> str:
    """Text of a message's content: a string, or text blocks (other block types are refused)."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"SharedLLM reads text only; got a {kind!r} content block. Pass text content.")
    return "".join(parts)
