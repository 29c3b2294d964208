"""SharedLLM for LlamaIndex: a `CustomLLM` that reads long contexts as injected states, not prompt text."""

from __future__ import annotations

import asyncio
import logging
import threading
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

from sharedctx.contexts import TextTreeCache, find_index

__all__ = ["SharedLLM"]

logger = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant",
          "chatbot": "assistant", "tool": "tool", "function": "tool"}
_CALL_OPTIONS = ("context", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class SharedLLM(CustomLLM):
    """A `sharedctx.SharedLLM` as a LlamaIndex LLM (``Settings.llm = SharedLLM()`` works).

    ``complete`` wraps the prompt as one user turn in the base model's chat template; ``chat`` formats the whole
    conversation with it. A long ``context`` (text, nodes / Documents, a `sharedctx.ContextTree`, a
    `SharedContextIndex` or a `sharedctx.index.ContextIndex`) is never put into the prompt: it is compressed by the
    model's bottom layers and read back as injected states. Bind it as a field or pass ``context=`` per call; a
    text context is encoded once and reused; an index selects nodes for the prompt (``complete``) or the last user
    message (``chat``) from its store.

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
    max_new_tokens: int = Field(default=256, ge=1, description="tokens generated at most (num_output)")
    temperature: float = Field(default=0.0, ge=0.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    context_window: int | None = Field(default=None, description="the base model's window (read from it when None)")
    context_cache_size: int = Field(default=8, ge=0)

    _contexts: TextTreeCache = PrivateAttr(default_factory=TextTreeCache)
    _load_lock: Any = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        self._contexts.size = self.context_cache_size

    @classmethod
    def class_name(cls) -> str:
        return "SharedLLM_sharedctx"

    # ------------------------------------------------------------------ model
    def get_llm(self) -> Any:
        """The `sharedctx.SharedLLM` behind this LLM (loaded on first use)."""
        if self.llm is None:
            with self._load_lock:
                if self.llm is None:
                    self.llm = load_llm(self.model_name, self.adapter, self.device, self.dtype)
        return self.llm

    @property
    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.llm is not None:
            name = getattr(getattr(getattr(self.llm, "base", None), "config", None), "_name_or_path", "")
            return str(name) if name else "sharedctx-custom"
        from sharedctx.base_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME

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
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS) - {"formatted"})
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

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The token ids the model is given for ``messages``: the base model's chat template, nothing else."""
        turns = []
        for m in messages:
            role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
            if role not in _ROLES:
                raise ValueError(f"SharedLLM cannot format a message of role {role!r}")
            turns.append({"role": _ROLES[role], "content": m.content or ""})
        if not turns:
            raise ValueError("SharedLLM needs at least one message")
        return self.get_llm().chat_prompt_ids(turns)

    def _deltas(self, messages: Sequence[ChatMessage], question: str, stats: dict[str, Any], kwargs: dict[str, Any]) -> Iterator[str]:
        options = self._options(kwargs)
        llm = self.get_llm()
        context = kwargs.get("context", self.context)
        ids = self.prompt_ids(messages)
        index = find_index(context)
        if index is not None:
            if index.llm is not llm:
                raise ValueError("this index was built with another sharedctx.SharedLLM than this LLM's; pass llm=index.llm")
            yield from index.stream(question, mode="latent", prompt=ids, stats=stats, **options)
            stats["citations"] = [c.to_dict() for c in stats.get("citations", [])]
        else:
            tree = self._contexts.context(llm, context)
            yield from llm.stream(ids, context=tree, stats=stats, **options)
        stats["max_new_tokens"] = options["max_new_tokens"]

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
            for key in ("documents", "chunks_selected", "chunks_encoded", "chunks_cached"):
                extra[key] = int(stats.get(key, 0))
        return {"usage": usage, **extra}, extra

    def _complete_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        messages = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt)] if self.system_prompt else []
        return messages + [ChatMessage(role=MessageRole.USER, content=prompt)]

    @staticmethod
    def _question(messages: Sequence[ChatMessage]) -> str:
        for m in reversed(messages):
            if m.role == MessageRole.USER:
                return m.content or ""
        return ""

    # ------------------------------------------------------------------ completion
    # The public methods carry LlamaIndex's callback decorators; the async ones run the undecorated bodies in a
    # thread, so each call reaches the callback manager once (a decorated async calling a decorated sync would
    # report it twice and double every token count).
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, formatted, kwargs)

    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponse:
        stats: dict[str, Any] = {}
        text = "".join(self._deltas(self._complete_messages(prompt, formatted), prompt, stats, kwargs))
        raw, extra = self._raw(stats)
        return CompletionResponse(text=text, raw=raw, additional_kwargs=extra)

    def _stream_complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponseGen:
        messages = self._complete_messages(prompt, formatted)

        def gen() -> CompletionResponseGen:
            stats: dict[str, Any] = {}
            text = ""
            for delta in self._deltas(messages, prompt, stats, kwargs):
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            raw, extra = self._raw(stats)
            yield CompletionResponse(text=text, delta="", raw=raw, additional_kwargs=extra)

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        messages = self._with_system(messages)
        stats: dict[str, Any] = {}
        text = "".join(self._deltas(messages, self._question(messages), stats, kwargs))
        raw, extra = self._raw(stats)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw, additional_kwargs=extra)

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        messages = self._with_system(messages)

        def gen() -> ChatResponseGen:
            stats: dict[str, Any] = {}
            text = ""
            for delta in self._deltas(messages, self._question(messages), stats, kwargs):
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
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self._complete(prompt, formatted, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self._chat(messages, kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        from sharedctx.concurrency import iterate_in_thread

        return iterate_in_thread(lambda: self._stream_complete(prompt, formatted, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        from sharedctx.concurrency import iterate_in_thread

        return iterate_in_thread(lambda: self._stream_chat(messages, kwargs))


def load_llm(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    """``SharedLLM.shared``: one model per set of options, shared by everything alive in this process."""
    from sharedctx import SharedLLM

    return SharedLLM.shared(model, adapter=adapter, device=device, dtype=dtype)
