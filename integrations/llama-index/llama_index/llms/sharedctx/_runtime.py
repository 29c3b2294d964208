"""Loading SharedLLM models once per process, encoding contexts once per text, and chat prompts as token ids.

Only sharedctx's public API is used here; sharedctx (and with it torch) is imported on first use, so importing
``llama_index.llms.sharedctx`` stays cheap. (langchain-sharedctx has its own copy: the two distributions do not
depend on each other.)
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["load_llm", "ContextCache", "message_text", "context_text", "as_context_index"]

logger = logging.getLogger(__name__)


def _sharedctx():
    try:
        import sharedctx
    except ImportError as exc:  # pragma: no cover - sharedctx is a declared dependency
        raise ImportError("llama-index-sharedctx needs sharedctx: `pip install sharedctx`") from exc
    return sharedctx


def load_llm(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    """``SharedLLM.shared``: one model per set of options, shared by everything alive in this process."""
    return _sharedctx().SharedLLM.shared(model, adapter=adapter, device=device, dtype=dtype)


def as_context_index(obj: Any) -> Any:
    """The `sharedctx.index.ContextIndex` behind ``obj`` (itself, or a SharedContextIndex's), else None."""
    import sys

    module = sys.modules.get("sharedctx.index")
    if module is None:
        return None
    if isinstance(obj, module.ContextIndex):
        return obj
    inner = getattr(obj, "context_index", None)
    return inner if isinstance(inner, module.ContextIndex) else None


def _node_text(node: Any) -> str | None:
    if isinstance(node, str):
        return node
    node = getattr(node, "node", node)  # NodeWithScore
    get_content = getattr(node, "get_content", None)
    return str(get_content()) if callable(get_content) else None


def context_text(context: Any) -> str | None:
    """The text of a context given as a string, a node / Document (or NodeWithScore), or a sequence of them."""
    if isinstance(context, (list, tuple)):
        parts = [_node_text(c) for c in context]
        return None if any(p is None for p in parts) else "\n\n".join(parts)  # type: ignore[arg-type]
    return _node_text(context)


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
                f"cannot use a {type(context).__name__} as context: pass text, a node or Document, a list of them, "
                "a sharedctx.ContextTree (from `llm.encode(text)`), a SharedContextIndex or a sharedctx.index.ContextIndex"
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
