"""What the LangChain and LlamaIndex integrations share: contexts as applications hand them over (text, documents
of LangChain or LlamaIndex, lists of them, encoded trees or an index) resolved to what `SharedLLM` reads, with the
trees of recent texts kept so a bound document is encoded once; the one model loader behind their chat model and
LLM (`load_llm`, `holder_llm`); and the one answer loop both run (`stream_reply`: a conversation read with a
context, an index in ``latent``, ``text`` or ``hybrid`` mode). Both integrations import this module at their own
import time: it imports neither torch nor the rest of sharedctx until a model is loaded or a context encoded."""

from __future__ import annotations

import hashlib
import sys
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # imported when used: importing this module loads neither torch nor a model
    from .index.facade import ContextIndex
    from .model import SharedLLM
    from .tree import ContextTree

__all__ = [
    "TextTreeCache",
    "context_text",
    "message_text",
    "find_index",
    "load_llm",
    "holder_llm",
    "model_name",
    "question_text",
    "stream_reply",
]


def _item_text(item: Any) -> str | None:
    """Text of a string, a LangChain ``Document`` (``page_content``) or a LlamaIndex node / ``NodeWithScore``."""
    if isinstance(item, str):
        return item
    if hasattr(item, "page_content"):
        return str(item.page_content)
    item = getattr(item, "node", item)  # NodeWithScore wraps its node
    get_content = getattr(item, "get_content", None)
    return str(get_content()) if callable(get_content) else None


def context_text(context: Any) -> str | None:
    """The text of a context given as a string, a document or node, or a sequence of them (joined by blank
    lines); None when ``context`` is none of these."""
    if isinstance(context, (list, tuple)):
        parts = [_item_text(c) for c in context]
        return None if any(p is None for p in parts) else "\n\n".join(parts)  # type: ignore[arg-type]
    return _item_text(context)


def message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or text blocks (other block types are refused)."""
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


def find_index(obj: Any) -> ContextIndex | None:
    """The `ContextIndex` behind ``obj`` (itself, or the ``context_index`` of a wrapper such as LlamaIndex's
    ``SharedContextIndex``), else None. Never imports sharedctx.index: no index exists before it is loaded."""
    module = sys.modules.get("sharedctx.index.facade")
    if module is None:
        return None
    if isinstance(obj, module.ContextIndex):
        return obj
    inner = getattr(obj, "context_index", None)
    return inner if isinstance(inner, module.ContextIndex) else None


class TextTreeCache:
    """Context trees encoded once per (model, text): a small thread-safe LRU for applications that ask many
    questions about the same few texts (a chat model with a bound document, a notebook).

    Trees are encoded with ``precompute=True`` (every node of every chunk), so any later question about the
    same text injects states without running the lower model again. ``size=0`` keeps nothing.

    >>> cache = TextTreeCache(size=4)
    >>> tree = cache.tree(llm, text)      # encodes
    >>> tree is cache.tree(llm, text)     # a hit: the same tree
    True
    """

    def __init__(self, size: int = 8) -> None:
        if size < 0:
            raise ValueError(f"TextTreeCache size must be >= 0, got {size}")
        self.size = size
        # (id(model), sha256 of the text) -> (weak reference to the model, tree); the reference guards against a
        # new model that reuses a collected one's id
        self._trees: OrderedDict[tuple[int, str], tuple[weakref.ref, ContextTree]] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # texts encoded (misses)
        self.hits = 0

    def __len__(self) -> int:
        return len(self._trees)

    def clear(self) -> None:
        with self._lock:
            self._trees.clear()

    def tree(self, llm: SharedLLM, text: str) -> ContextTree:
        """The encoded tree of ``text`` for ``llm`` (encoding it on a miss)."""
        if not isinstance(text, str):
            raise TypeError(f"TextTreeCache caches text contexts; got {type(text).__name__}")
        key = (id(llm), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            entry = self._trees.get(key)
            if entry is not None and entry[0]() is llm:
                self._trees.move_to_end(key)
                self.hits += 1
                return entry[1]
        tree = llm.encode(text, precompute=True)  # outside the lock: encoding may take seconds
        with self._lock:
            self.encoded += 1
            if self.size:
                self._trees[key] = (weakref.ref(llm), tree)
                while len(self._trees) > self.size:
                    self._trees.popitem(last=False)
        return tree

    def context(self, llm: SharedLLM, context: Any) -> ContextTree | None:
        """A `ContextTree` for ``context``: a tree as it is; text, a document or node, or a list of them encoded
        (once per text, through this cache); None for None or empty text. Anything else is a TypeError."""
        if context is None:
            return None
        from .tree import ContextTree

        if isinstance(context, ContextTree):
            return context
        text = context_text(context)
        if text is None:
            raise TypeError(
                f"cannot use a {type(context).__name__} as context: pass text, a document or node, a list of them, "
                "a sharedctx.ContextTree (from `llm.encode(text)`) or a sharedctx ContextIndex"
            )
        return self.tree(llm, text) if text else None


# ---------------------------------------------------------------------- the model behind a chat model / LLM
_LOAD_LOCK = threading.Lock()


def load_llm(model: str | None = None, *, adapter: str | None = None, device: str | None = None, dtype: str | None = None) -> SharedLLM:
    """`SharedLLM.shared`: one model per set of options, shared by everything alive in this process (``model``
    None: the default model, SmolLM2-135M-Instruct, with its default adapter)."""
    from .model import SharedLLM as _SharedLLM

    return _SharedLLM.shared(model, adapter=adapter, device=device, dtype=dtype)


def holder_llm(holder: Any) -> SharedLLM:
    """``holder.llm``, loaded on first use with `load_llm` from ``holder.model_name`` / ``adapter`` / ``device`` /
    ``dtype`` and kept there: the chat model and LLM of the integrations. Concurrent first calls load once."""
    if holder.llm is None:
        with _LOAD_LOCK:
            if holder.llm is None:
                holder.llm = load_llm(holder.model_name, adapter=holder.adapter, device=holder.device, dtype=holder.dtype)
    return holder.llm


def model_name(holder: Any) -> str:
    """The base model a holder runs, as a name: ``holder.model_name``, else the loaded model's own name (or
    ``sharedctx-custom`` for one built in memory), else the default model's id (nothing is loaded for it)."""
    if holder.model_name:
        return str(holder.model_name)
    if holder.llm is not None:
        config = getattr(getattr(holder.llm, "base", None), "config", None)
        name = getattr(config, "_name_or_path", "") if config is not None else ""
        return str(name) if name else "sharedctx-custom"
    from .base_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def question_text(value: Any, what: str = "the prompt") -> str:
    """``value`` when it is a string; a `TypeError` naming the type received otherwise (None, a number, a message
    object...), so a wrong argument is never answered as if it were a question."""
    if isinstance(value, str):
        return value
    raise TypeError(f"{what} must be a string, got {type(value).__name__}{'' if value is None else f' ({value!r:.40})'}")


# ---------------------------------------------------------------------- one answer loop for both integrations
def _last_user(turns: Sequence[Mapping[str, str]]) -> int:
    for i in range(len(turns) - 1, -1, -1):
        if turns[i]["role"] == "user":
            return i
    raise ValueError("answering from a ContextIndex needs a user message to select context for")


def stream_reply(
    llm: SharedLLM,
    turns: Sequence[Mapping[str, str]],
    *,
    context: Any,
    trees: TextTreeCache,
    mode: str,
    options: Mapping[str, Any],
    stats: dict[str, Any],
    question: str | None = None,
) -> Iterator[str]:
    """The reply to a conversation (``{"role", "content"}`` turns, read in the base model's chat template), with
    ``context`` read as the integrations promise; ``stats`` receives the answer's statistics at the end.

    - no context, text, documents or a tree: the conversation is the prompt and the context is injected (a text is
      encoded once per ``trees``); ``mode`` does not apply (a whole text is never pasted into the prompt).
    - an index (a `ContextIndex` or a wrapper holding one): nodes are selected for ``question`` (default: the last
      user turn) and read as ``mode`` says: ``latent`` injects their states and the conversation is the prompt;
      ``text`` puts their spans into the last user turn as numbered passages (the index's own passage prompt);
      ``hybrid`` does both. A conversation of one user turn gets exactly `ContextIndex.stream`'s answer; earlier
      turns (a system prompt, a history) are kept in front of it. ``stats["citations"]`` lists the nodes read.

    ``options``: sampling options of `SharedLLM.stream` (``max_new_tokens``, ``temperature``, ...).
    """
    from .config import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = find_index(context)
    if index is None:
        tree = trees.context(llm, context)
        yield from llm.stream(llm.chat_prompt_ids(turns), context=tree, stats=stats, **options)
    else:
        if index.llm is not llm:
            raise ValueError("this index was built with another sharedctx.SharedLLM than this model's; build the chat model / LLM with llm=index.llm")
        at = _last_user(turns)
        question = turns[at]["content"] if question is None else question
        if mode == "latent":
            yield from index.stream(question, mode="latent", prompt=llm.chat_prompt_ids(turns), stats=stats, **options)
        elif len(turns) == 1 and turns[0]["content"] == question:
            yield from index.stream(question, mode=mode, stats=stats, **options)
        else:
            yield from _reply_with_passages(index, llm, turns, at, question, mode, options, stats)
        stats["citations"] = [c.to_dict() for c in stats.get("citations", [])]
    stats["max_new_tokens"] = options["max_new_tokens"]


def _reply_with_passages(index: ContextIndex, llm: SharedLLM, turns: Sequence[Mapping[str, str]], at: int, question: str,
                         mode: str, options: Mapping[str, Any], stats: dict[str, Any]) -> Iterator[str]:
    """``text`` / ``hybrid`` over a conversation: the index's passage prompt for ``question`` replaces the last user
    turn (the turns before it stay); ``hybrid`` also injects the selected states."""
    from .index.retrieval import text_prompt  # an index exists, so sharedctx.index is loaded already

    citations = index.retrieve(question)
    passages, dropped = text_prompt(llm, question, citations, options["max_new_tokens"])
    ids = llm.chat_prompt_ids([*turns[:at], {"role": "user", "content": passages}, *turns[at + 1 :]])
    if mode == "hybrid":  # the same selection again, now injected
        yield from index.stream(question, mode="latent", prompt=ids, stats=stats, **options)
    else:
        yield from llm.stream(ids, stats=stats, **options)
        stats.update(citations=citations, documents=len({c.doc_id for c in citations}),
                     chunks_selected=len({(c.doc_id, c.chunk) for c in citations}))
    stats.update(mode=mode, text_passages_dropped=dropped)
