"""Loading SharedLLM models once per process, encoding contexts once per text, and chat prompts as token ids.

Only sharedctx's public API is used here; sharedctx (and with it torch) is imported on first use, so importing
``langchain_sharedctx`` stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["load_llm", "ContextCache", "message_text", "context_text", "is_index"]

logger = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _sharedctx():
    try:
        import sharedctx
    except ImportError as exc:  # pragma: no cover - sharedctx is a declared dependency
        raise ImportError("langchain-sharedctx needs sharedctx: `pip install sharedctx`") from exc
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
                f"cannot use a {type(context).__name__} as context: pass text, a Document, a list of Documents "
                "or strings, a sharedctx.ContextTree (from `llm.encode(text)`) or a sharedctx.index.ContextIndex"
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
