"""ChatSharedLLM: a LangChain chat model that reads long contexts as injected states, not prompt text."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, model_validator

from sharedctx.contexts import TextTreeCache, find_index, message_text

__all__ = ["ChatSharedLLM"]

logger = logging.getLogger(__name__)

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}
#: options of hosted chat models that mean nothing for a local model; accepted (so generic code and the standard
#: tests can pass them) and logged
_REMOTE_ONLY = ("api_key", "timeout", "max_retries", "base_url", "request_timeout")
#: per-call options (``invoke(..., **kw)`` or ``.bind(**kw)``)
_CALL_OPTIONS = ("context", "max_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "model", "stream")


def last_user_text(messages: list[BaseMessage]) -> str:
    """The text of the last human message: the question a ContextIndex selects nodes for."""
    for m in reversed(messages):
        if m.type == "human" or (isinstance(m, ChatMessage) and m.role == "user"):
            return message_text(m.content)
    raise ValueError("answering from a ContextIndex needs a user message to select context for")


class ChatSharedLLM(BaseChatModel):
    """A SharedLLM as a LangChain chat model.

    Messages are formatted with the base model's own chat template. A long ``context`` (text, Documents or a
    `sharedctx.ContextTree`, or a `sharedctx.index.ContextIndex` over many documents) is never put into the prompt: it is compressed into a context tree by the model's
    bottom layers and read back through cross-attention, so it costs a few injected states per chunk instead
    of its length in prompt tokens. A ContextIndex selects the nodes for the last user message from its store
    (encoded once, on disk) and reports them as ``response_metadata["citations"]``. Bind it once (``ChatSharedLLM(context=...)`` or ``chat.bind(context=...)``)
    or pass it per call (``chat.invoke(messages, context=...)``); a text context is encoded once and reused.

    Example:
        .. code-block:: python

            from langchain_sharedctx import ChatSharedLLM

            chat = ChatSharedLLM(max_tokens=64)  # the default model, SmolLM2-135M-Instruct
            chat.invoke("Who keeps the logbook?", context=open("harrow_point.txt").read())

    Args:
        llm: an existing `sharedctx.SharedLLM` (for example a fine-tuned one); otherwise one is loaded from
            ``model`` / ``adapter`` on first use and shared with every chat model that names the same options.
        model: base model id or local folder; None for the default model.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    llm: Any = Field(default=None, exclude=True, description="a sharedctx.SharedLLM; loaded from `model` when None")
    model_name: str | None = Field(default=None, alias="model", description="base model id or path; None: default")
    adapter: str | None = Field(default=None, description="adapter folder; None: the default adapter of the default model")
    device: str | None = None
    dtype: str | None = None
    context: Any = Field(default=None, exclude=True, description="bound context: text, Documents or a ContextTree")
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=256, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False
    context_cache_size: int = Field(default=8, ge=0, description="encoded text contexts kept per chat model")

    _contexts: TextTreeCache = PrivateAttr(default_factory=TextTreeCache)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_options(cls, values: Any) -> Any:
        if isinstance(values, dict):
            dropped = [k for k in _REMOTE_ONLY if k in values]
            if dropped:
                values = {k: v for k, v in values.items() if k not in _REMOTE_ONLY}
                logger.info("ChatSharedLLM runs locally; ignoring hosted-model options %s", dropped)
        return values

    def model_post_init(self, __context: Any) -> None:
        self._contexts.size = self.context_cache_size

    # ------------------------------------------------------------------ model
    def get_llm(self) -> Any:
        """The `sharedctx.SharedLLM` behind this chat model (loaded on first use)."""
        if self.llm is None:
            with self._load_lock:
                if self.llm is None:
                    self.llm = _load_llm(self.model_name, self.adapter, self.device, self.dtype)
        return self.llm

    @property
    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.llm is not None:
            name = getattr(getattr(self.llm, "base", None), "config", None)
            name = getattr(name, "_name_or_path", "") if name is not None else ""
            if name:
                return str(name)
        from sharedctx.base_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME if self.llm is None else "sharedctx-custom"

    @property
    def _llm_type(self) -> str:
        return "sharedctx-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model_name": self.resolved_model_name,
            "adapter": self.adapter,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        if self.llm is not None:
            params["fingerprint"] = getattr(self.llm, "fingerprint", None)
            config = getattr(self.llm, "config", None)
            if config is not None:
                params["config"] = config.to_dict()
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="sharedctx",
            ls_model_name=kwargs.get("model") or self.resolved_model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ preparing a call
    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS))
        if unknown:
            raise TypeError(f"ChatSharedLLM got unknown call options {unknown}; it accepts {sorted(_CALL_OPTIONS)}")
        model = kwargs.get("model")
        if model is not None and model != self.resolved_model_name:
            raise ValueError(
                f"this ChatSharedLLM runs {self.resolved_model_name!r} and cannot switch to {model!r} per call; "
                "build another ChatSharedLLM(model=...)"
            )
        max_new = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        return {
            "max_new_tokens": int(max_new),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_k": int(kwargs.get("top_k", self.top_k)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stop if stop is not None else (self.stop or [])),
        }

    def prompt_ids(self, messages: list[BaseMessage]) -> list[int]:
        """The token ids the model is given for ``messages``: the base model's chat template, nothing else."""
        turns = []
        for m in messages:
            role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
            if role is None:
                raise ValueError(f"ChatSharedLLM cannot format a {type(m).__name__} (type {m.type!r})")
            turns.append({"role": role, "content": message_text(m.content)})
        if not turns:
            raise ValueError("ChatSharedLLM needs at least one message")
        return self.get_llm().chat_prompt_ids(turns)

    def _deltas(self, messages: list[BaseMessage], stop: list[str] | None, stats: dict[str, Any], kwargs: dict[str, Any]) -> Iterator[str]:
        options = self._options(stop, kwargs)
        llm = self.get_llm()
        context = kwargs.get("context", self.context)
        ids = self.prompt_ids(messages)
        if find_index(context) is not None:
            # the index selects nodes for the last question and injects their stored states; the model reads the
            # whole conversation
            if context.llm is not llm:
                raise ValueError("this ContextIndex was built with another SharedLLM than this chat model's; pass llm=index.llm")
            yield from context.stream(last_user_text(messages), mode="latent", prompt=ids, stats=stats, **options)
            stats["citations"] = [c.to_dict() for c in stats.get("citations", [])]
        else:
            tree = self._contexts.context(llm, context)
            yield from llm.stream(ids, context=tree, stats=stats, **options)
        stats["max_new_tokens"] = options["max_new_tokens"]

    def _metadata(self, stats: dict[str, Any]) -> tuple[UsageMetadata, dict[str, Any]]:
        prompt, generated = int(stats.get("prompt_tokens", 0)), int(stats.get("generated_tokens", 0))
        usage = UsageMetadata(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated)
        finish = "length" if generated >= stats.get("max_new_tokens", float("inf")) else "stop"
        meta = {
            "model_name": self.resolved_model_name,
            "model_provider": "sharedctx",
            "finish_reason": finish,
            "injected_states": int(stats.get("injected_states", 0)),
            "context_tokens": int(stats.get("context_tokens", 0)),
            "chunks": int(stats.get("chunks", 0)),
            "injected_nodes": list(stats.get("injected_nodes", [])),
            "timings": dict(stats.get("timings", {})),
        }
        if "citations" in stats:  # answered from a ContextIndex
            meta["citations"] = stats["citations"]
            for key in ("documents", "chunks_selected", "chunks_encoded", "chunks_cached"):
                meta[key] = int(stats.get(key, 0))
        return usage, meta

    # ------------------------------------------------------------------ LangChain entry points
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        stats: dict[str, Any] = {}
        text = "".join(self._deltas(messages, stop, stats, kwargs))
        usage, meta = self._metadata(stats)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": meta["finish_reason"]})],
            llm_output={"model_name": meta["model_name"], "token_usage": dict(usage)},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stats: dict[str, Any] = {}
        for delta in self._deltas(messages, stop, stats, kwargs):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stats)

    def _last_chunk(self, stats: dict[str, Any]) -> ChatGenerationChunk:
        usage, meta = self._metadata(stats)
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last"),
            generation_info={"finish_reason": meta["finish_reason"]},
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self._generate(messages, stop, None, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        from sharedctx.concurrency import iterate_in_thread

        stats: dict[str, Any] = {}
        async for delta in iterate_in_thread(lambda: self._deltas(messages, stop, stats, kwargs)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stats)


def _load_llm(model: str | None, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    """``SharedLLM.shared``: one model per set of options, shared by everything alive in this process."""
    from sharedctx import SharedLLM

    return SharedLLM.shared(model, adapter=adapter, device=device, dtype=dtype)
