"""SharedLLM for LlamaIndex: a `CustomLLM` that reads long contexts as injected states, not prompt text."""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field, PrivateAttr

from sharedctx.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, MODES
from sharedctx.contexts import TextTreeCache, find_index, holder_llm, model_name, question_text, stream_reply

__all__ = ["SharedLLM", "selecting_for"]

logger = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant",
          "chatbot": "assistant", "tool": "tool", "function": "tool"}
_CALL_OPTIONS = ("context", "mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
#: generation settings of a SharedLLM (copied into the LLM a query engine answers with)
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
#: (index, question): while set, an LLM reading that index selects its nodes for this question, whatever its prompt
#: (a LlamaIndex response synthesizer's prompt holds passages and templates, not the question alone)
_SELECTING_FOR: ContextVar[tuple[Any, str] | None] = ContextVar("sharedctx_selecting_for", default=None)


@contextmanager
def selecting_for(index: Any, question: str) -> Iterator[None]:
    """Within this block, a SharedLLM whose context is ``index`` selects the nodes it injects for ``question`` (the
    query), not for its prompt: how a hybrid query engine injects the query's selection under a synthesizer's prompt."""
    token = _SELECTING_FOR.set((find_index(index), question))
    try:
        yield
    finally:
        _SELECTING_FOR.reset(token)


class SharedLLM(CustomLLM):
    """A `sharedctx.SharedLLM` as a LlamaIndex LLM (``Settings.llm = SharedLLM()`` works).

    ``complete`` wraps the prompt as one user turn in the base model's chat template; ``chat`` formats the whole
    conversation with it. A long ``context`` (text, nodes / Documents or a `sharedctx.ContextTree`) is never put
    into the prompt: it is compressed by the model's bottom layers and read back as injected states; a text context
    is encoded once and reused. An index (a `SharedContextIndex` or a `sharedctx.index.ContextIndex`) selects nodes
    for the prompt (``complete``) or the last user message (``chat``) from its store, with the index's policy
    (``lexical``, BM25 of the nodes' text, unless it was built with another: `sharedctx.config.DEFAULT_POLICY`),
    and the answer reads them as ``mode`` says: ``hybrid`` (the default, `sharedctx.config.DEFAULT_MODE`: the spans
    as numbered passages in the last user message and their states injected), ``text`` (passages only) or
    ``latent`` (states only). Bind a context as a field or pass ``context=`` (and ``mode=``) per call.

    Every response carries exact token counts in ``raw["usage"]`` (so `TokenCountingHandler` needs no tokenizer of
    its own) and what was injected in ``additional_kwargs``.

    Args:
        llm: an existing `sharedctx.SharedLLM`; otherwise one is loaded from ``model_name`` / ``adapter`` on first
            use and shared by every instance naming the same options.
        model_name: base model id or local folder; None for the default model (SmolLM2-135M-Instruct).
    """

    llm: Any = Field(default=None, exclude=True, description="a sharedctx.SharedLLM; loaded from model_name when None")
    model_name: str | None = Field(default=None, description="base model id or path; None: the default model")
    adapter: str | None = Field(default=None, description="adapter folder; None: the default adapter of the default model")
    device: str | None = None
    dtype: str | None = None
    context: Any = Field(default=None, exclude=True, description="bound context: text, nodes, a ContextTree or an index")
    mode: str = Field(default=DEFAULT_MODE, description=f"how an index context is read: one of {MODES}")
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, description="tokens generated at most (num_output)")
    temperature: float = Field(default=0.0, ge=0.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    context_window: int | None = Field(default=None, description="the base model's window (read from it when None)")
    context_cache_size: int = Field(default=8, ge=0)

    _contexts: TextTreeCache = PrivateAttr(default_factory=TextTreeCache)

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self._contexts.size = self.context_cache_size

    @classmethod
    def class_name(cls) -> str:
        return "SharedLLM_sharedctx"

    # ------------------------------------------------------------------ model
    def get_llm(self) -> Any:
        """The `sharedctx.SharedLLM` behind this LLM (loaded on first use)."""
        return holder_llm(self)

    @property
    def resolved_model_name(self) -> str:
        return model_name(self)

    @property
    def metadata(self) -> LLMMetadata:
        window = self.context_window or self.get_llm().max_positions or 2048
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.resolved_model_name,
        )

    # ------------------------------------------------------------------ one generation
    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS) - {"formatted", "_question"})
        if unknown:
            raise TypeError(f"SharedLLM got unknown options {unknown}; it accepts {list(_CALL_OPTIONS)}")
        stop = kwargs.get("stop", self.stop)
        return {
            "max_new_tokens": int(kwargs.get("max_new_tokens", self.max_new_tokens)),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_k": int(kwargs.get("top_k", self.top_k)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "seed": kwargs.get("seed", self.seed),
            "stop": [stop] if isinstance(stop, str) else list(stop or ()),
        }

    @staticmethod
    def _turns(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        turns = []
        for m in messages:
            role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
            if role not in _ROLES:
                raise ValueError(f"SharedLLM cannot format a message of role {role!r}")
            turns.append({"role": _ROLES[role], "content": m.content or ""})
        if not turns:
            raise ValueError("SharedLLM needs at least one message")
        return turns

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The token ids the model is given for ``messages``: the base model's chat template, nothing else."""
        return self.get_llm().chat_prompt_ids(self._turns(messages))

    def _bound(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the question an index context selects for, when `selecting_for` names it (read when the
        call is made: a stream or a thread that runs later sees what was set then)."""
        pinned = _SELECTING_FOR.get()
        if pinned is not None and "_question" not in kwargs:
            index = find_index(kwargs.get("context", self.context))
            if index is not None and index is pinned[0]:
                return {**kwargs, "_question": pinned[1]}
        return kwargs

    def _deltas(self, messages: Sequence[ChatMessage], stats: dict[str, Any], kwargs: dict[str, Any]) -> Iterator[str]:
        options = self._options(kwargs)
        yield from stream_reply(self.get_llm(), self._turns(messages), context=kwargs.get("context", self.context), trees=self._contexts,
                                mode=kwargs.get("mode", self.mode), options=options, stats=stats, question=kwargs.get("_question"))

    def _raw(self, stats: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        prompt, generated = int(stats.get("prompt_tokens", 0)), int(stats.get("generated_tokens", 0))
        usage = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
        extra: dict[str, Any] = {
            "model_name": self.resolved_model_name,
            "finish_reason": "length" if generated >= stats.get("max_new_tokens", float("inf")) else "stop",
            "injected_states": int(stats.get("injected_states", 0)),
            "context_tokens": int(stats.get("context_tokens", 0)),
            "chunks": int(stats.get("chunks", 0)),
            "injected_nodes": list(stats.get("injected_nodes", [])),
            "timings": dict(stats.get("timings", {})),
        }
        if "citations" in stats:
            extra["citations"] = stats["citations"]
            extra["mode"] = stats.get("mode")
            for key in ("documents", "chunks_selected", "chunks_encoded", "chunks_cached", "text_passages_dropped"):
                extra[key] = int(stats.get(key, 0))
        return {"usage": usage, **extra}, extra

    def _complete_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        prompt = question_text(prompt, "SharedLLM.complete's prompt")
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        messages = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt)] if self.system_prompt else []
        return messages + [ChatMessage(role=MessageRole.USER, content=prompt)]

    # ------------------------------------------------------------------ completion
    # The public methods carry LlamaIndex's callback decorators; the async ones run the undecorated bodies in a
    # thread, so each call reaches the callback manager once (a decorated async calling a decorated sync would
    # report it twice and double every token count).
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, self._bound(kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, formatted, kwargs)

    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponse:
        stats: dict[str, Any] = {}
        text = "".join(self._deltas(self._complete_messages(prompt, formatted), stats, kwargs))
        raw, extra = self._raw(stats)
        return CompletionResponse(text=text, raw=raw, additional_kwargs=extra)

    def _stream_complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponseGen:
        messages = self._complete_messages(prompt, formatted)
        kwargs = self._bound(kwargs)

        def gen() -> CompletionResponseGen:
            stats: dict[str, Any] = {}
            text = ""
            for delta in self._deltas(messages, stats, kwargs):
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            raw, extra = self._raw(stats)
            yield CompletionResponse(text=text, delta="", raw=raw, additional_kwargs=extra)

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, self._bound(kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        messages = self._with_system(messages)
        stats: dict[str, Any] = {}
        text = "".join(self._deltas(messages, stats, kwargs))
        raw, extra = self._raw(stats)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw, additional_kwargs=extra)

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        messages = self._with_system(messages)
        kwargs = self._bound(kwargs)

        def gen() -> ChatResponseGen:
            stats: dict[str, Any] = {}
            text = ""
            for delta in self._deltas(messages, stats, kwargs):
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            raw, extra = self._raw(stats)
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="", raw=raw, additional_kwargs=extra)

        return gen()

    def _with_system(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        messages = list(messages)
        if self.system_prompt and not any(m.role == MessageRole.SYSTEM for m in messages):
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return messages

    # ------------------------------------------------------------------ async: threads, never asyncio.run; undecorated bodies
    # (`_bound` runs here, in the caller's context: the worker thread does not see its context variables)
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        kwargs = self._bound(kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self._complete(prompt, formatted, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        kwargs = self._bound(kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self._chat(messages, kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        from sharedctx.concurrency import iterate_in_thread

        kwargs = self._bound(kwargs)
        return iterate_in_thread(lambda: self._stream_complete(prompt, formatted, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        from sharedctx.concurrency import iterate_in_thread

        kwargs = self._bound(kwargs)
        return iterate_in_thread(lambda: self._stream_chat(messages, kwargs))
