"""ChatSharedLLM: a LangChain chat model that reads long contexts as injected states, not prompt text."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Iterator, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from sharedctx.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, MODES
from sharedctx.contexts import TextTreeCache, holder_llm, message_text, model_name, stream_reply

__all__ = ["ChatSharedLLM"]

logger = logging.getLogger(__name__)

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}
#: options of hosted chat models that mean nothing for a local model; accepted (so generic code and the standard
#: tests can pass them) and logged
_REMOTE_ONLY = ("api_key", "timeout", "max_retries", "base_url", "request_timeout")
#: per-call options (``invoke(..., **kw)`` or ``.bind(**kw)``)
_CALL_OPTIONS = ("context", "mode", "max_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "model", "stream")


class ChatSharedLLM(BaseChatModel):
    """A SharedLLM as a LangChain chat model.

    Messages are formatted with the base model's own chat template. A long ``context`` (text, Documents or a
    `sharedctx.ContextTree`) is never put into the prompt: it is compressed into a context tree by the model's
    bottom layers and read back through cross-attention, so it costs a few injected states per chunk instead of its
    length in prompt tokens; a text context is encoded once and reused. A `sharedctx.index.ContextIndex` over many
    documents selects nodes for the last user message (with the index's policy: ``lexical``, BM25 of the nodes'
    text, unless the index was built with another) and the answer reads them as ``mode`` says: ``hybrid`` (the
    default, `sharedctx.config.DEFAULT_MODE`: their spans as numbered passages in the last user message *and* their
    states injected), ``text`` (the passages only) or ``latent`` (the states only; the conversation is the prompt).
    The nodes read come back as ``response_metadata["citations"]``. Bind a context once
    (``ChatSharedLLM(context=...)`` or ``chat.bind(context=...)``) or pass it per call
    (``chat.invoke(messages, context=..., mode=...)``).

    `get_num_tokens` / `get_token_ids` use the model's own tokenizer (offline), and `get_num_tokens_from_messages`
    counts the prompt the model reads (the chat template included).

    Example:
        .. code-block:: python

            from langchain_sharedctx import ChatSharedLLM

            chat = ChatSharedLLM(max_tokens=64)  # the default model, SmolLM2-135M-Instruct
            chat.invoke("Who keeps the logbook?", context=open("harrow_point.txt").read())

    Args:
        llm: an existing `sharedctx.SharedLLM` (for example a fine-tuned one); otherwise one is loaded from
            ``model`` / ``adapter`` on first use and shared with every chat model that names the same options.
        model: base model id or local folder; None for the default model.
        mode: how an index context is read: ``hybrid`` (default), ``text`` or ``latent``.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    llm: Any = Field(default=None, exclude=True, description="a sharedctx.SharedLLM; loaded from `model` when None")
    model_name: str | None = Field(default=None, alias="model", description="base model id or path; None: default")
    adapter: str | None = Field(default=None, description="adapter folder; None: the default adapter of the default model")
    device: str | None = None
    dtype: str | None = None
    context: Any = Field(default=None, exclude=True, description="bound context: text, Documents, a ContextTree or a ContextIndex")
    mode: str = Field(default=DEFAULT_MODE, description=f"how an index context is read: one of {MODES}")
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False
    context_cache_size: int = Field(default=8, ge=0, description="encoded text contexts kept per chat model")

    _contexts: TextTreeCache = PrivateAttr(default_factory=TextTreeCache)

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, value: str) -> str:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        return value

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
        return holder_llm(self)

    @property
    def resolved_model_name(self) -> str:
        return model_name(self)

    # ------------------------------------------------------------------ tokens: the model's own tokenizer
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer (no special tokens; offline; loads the model on first
        use). A ``custom_get_token_ids`` given to the chat model wins, as LangChain documents."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        if not isinstance(text, str):
            raise TypeError(f"get_token_ids takes a string, got {type(text).__name__}")
        return list(self.get_llm()._require_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens the model reads for ``messages``: the conversation in the base model's chat template, ready for
        the answer (exactly ``usage_metadata["input_tokens"]`` of a call without an index context)."""
        if tools:
            raise NotImplementedError("ChatSharedLLM does not support tools, so it cannot count their tokens")
        return len(self.prompt_ids(messages))

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

    @staticmethod
    def _turns(messages: list[BaseMessage]) -> list[dict[str, str]]:
        turns = []
        for m in messages:
            role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
            if role is None:
                raise ValueError(f"ChatSharedLLM cannot format a {type(m).__name__} (type {m.type!r})")
            turns.append({"role": role, "content": message_text(m.content)})
        if not turns:
            raise ValueError("ChatSharedLLM needs at least one message")
        return turns

    def prompt_ids(self, messages: list[BaseMessage]) -> list[int]:
        """The token ids the model is given for ``messages``: the base model's chat template, nothing else."""
        return self.get_llm().chat_prompt_ids(self._turns(messages))

    def _deltas(self, messages: list[BaseMessage], stop: list[str] | None, stats: dict[str, Any], kwargs: dict[str, Any]) -> Iterator[str]:
        options = self._options(stop, kwargs)
        mode = kwargs.get("mode", self.mode)
        yield from stream_reply(self.get_llm(), self._turns(messages), context=kwargs.get("context", self.context), trees=self._contexts,
                                mode=mode, options=options, stats=stats)

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
            meta["mode"] = stats.get("mode")
            for key in ("documents", "chunks_selected", "chunks_encoded", "chunks_cached", "text_passages_dropped"):
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

