"""Loading SharedLLM models once per process, encoding contexts once per text, and chat prompts as token ids.

Only sharedctx's public API is used here; sharedctx (and with it torch) is imported on first use, so importing
``llama_index.llms.sharedctx`` stays cheap. (langchain-sharedctx has its own copy: the two distributions do not
depend on each other.)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["load_llm", "ContextCache", "message_text", "context_text", "as_context_index"]

logger = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _sharedctx():
    try:
        import sharedctx
    except ImportError as exc:  # pragma: no cover - sharedctx is a declared dependency
        raise ImportError("llama-index-sharedctx needs sharedctx: `pip install sharedctx`") from exc
    return sharedctx


def load_llm(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    """``SharedLLM.from_pretrained`` for these options, shared by every chat model alive in this process."""
    key = (model, adapter, device, dtype)
    with _LOAD_LOCK:
        llm = _LOADED.get(key)
        if llm is None:
            sharedctx = _sharedctx()
            logger.info("loading SharedLLM base=%s adapter=%s", model or "<default>", adapter or "<default>")
            llm = sharedctx.SharedLLM.from_pretrained(model, adapter=adapter, device=device, dtype=dtype)
            _LOADED[key] = llm
        return llm


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
        self._trees: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # how many texts were encoded (misses)

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
        key = (id(llm), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            tree = self._trees.get(key)
            if tree is not None:
                self._trees.move_to_end(key)
                return tree
        tree = llm.encode(text, precompute=True)
        with self._lock:
            self.encoded += 1
            self._trees[key] = tree
            while len(self._trees) > max(self.size, 0):
                self._trees.popitem(last=False)
        return tree


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
