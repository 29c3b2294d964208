"""SharedContextQueryEngine: a RetrieverQueryEngine over a SharedContextIndex whose answers read the selected tree nodes
as passages, injected states or both (the stock engine would hand the LLM only their text)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Dict, Iterator, List, Optional, Sequence

from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms import LLM
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer, get_response_synthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType
from llama_index.core.settings import Settings

from sharedctx.config import DEFAULT_MODE, MODES

from .retriever import SharedContextRetriever, citation_to_node

__all__ = ["SharedContextQueryEngine", "SharedContextSynthesizer"]

dispatcher = get_dispatcher(__name__)

#: options of the engine's retriever
_RETRIEVER_OPTIONS = ("similarity_top_k", "top_k_chunks", "max_injected_states", "filters")
#: options that shape the prompt text of LlamaIndex's response synthesizers (`get_response_synthesizer`)
_RESPONSE_OPTIONS = tuple(
    name for name in inspect.signature(get_response_synthesizer).parameters if name not in ("llm", "callback_manager", "streaming")
)
_LATENT_SUPPORTS = (
    "latent mode reads the selected nodes as injected states with the question alone as the prompt, so it takes no "
    "prompt-text options; it supports streaming, llm (a SharedLLM: its max_new_tokens, temperature, top_k, top_p, seed, "
    "stop), those generation options, similarity_top_k, top_k_chunks, max_injected_states and callback_manager. "
)


class SharedContextSynthesizer(BaseSynthesizer):
    """The engine's default synthesizer: the answer `ContextIndex` gives for ``mode`` (``latent``: the question with
    the selected states injected; ``text``: the index's numbered-passage prompt; ``hybrid``: both), decoded by the
    engine's SharedLLM, so one LLM event (with exact token counts) reports it.

    Its prompt, in ``text`` and ``hybrid`` modes, is ``text_qa_template`` (the index's passage prompt; ``latent`` has
    none). Replacing it with `update_prompts` hands the prompt to LlamaIndex's compact synthesizer with that template
    (in ``hybrid`` mode the same SharedLLM still injects the query's selected states).
    """

    def __init__(self, llm: LLM, mode: str, *, streaming: bool = False, callback_manager: Optional[CallbackManager] = None) -> None:
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming)
        self._mode = mode
        self._custom: Optional[BaseSynthesizer] = None  # set when the template is replaced

    def _get_prompts(self) -> Dict[str, Any]:
        if self._custom is not None:
            return self._custom.get_prompts()
        if self._mode == "latent":
            return {}
        from sharedctx.index.retrieval import TEXT_PROMPT

        template = PromptTemplate(TEXT_PROMPT, template_var_mappings={"context_str": "passages", "query_str": "question"})
        return {"text_qa_template": template}

    def _update_prompts(self, prompts: Dict[str, Any]) -> None:
        if not prompts:
            return
        if self._mode == "latent":
            raise ValueError("latent mode has no prompt template (the prompt is the question); use mode='text' or 'hybrid'")
        if self._custom is None:
            self._custom = get_response_synthesizer(llm=_reading(self._llm, self._mode), streaming=self._streaming,
                                                    callback_manager=self._callback_manager, **prompts)
        else:
            self._custom.update_prompts(prompts)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> Any:
        raise NotImplementedError("SharedContextSynthesizer answers from the index in synthesize(), not from text chunks")

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> Any:
        raise NotImplementedError("SharedContextSynthesizer answers from the index in asynthesize(), not from text chunks")

    @dispatcher.span
    def synthesize(self, query: QueryType, nodes: List[NodeWithScore], additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
                   **response_kwargs: Any) -> RESPONSE_TYPE:
        if self._custom is not None:
            return self._custom.synthesize(query, nodes, additional_source_nodes, **response_kwargs)
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}) as event:
            if self._streaming:
                response: RESPONSE_TYPE = StreamingResponse(response_gen=iter(()), source_nodes=[], metadata={})
                parts = self._llm.stream_complete(query.query_str)

                def gen() -> Iterator[str]:
                    last = None
                    for last in parts:
                        if last.delta:
                            yield last.delta
                    if last is not None:
                        response.source_nodes.extend(_sources(last.additional_kwargs))
                        response.metadata.update(_metadata(last))

                response.response_gen = gen()
            else:
                answer = self._llm.complete(query.query_str)
                response = Response(response=answer.text, source_nodes=_sources(answer.additional_kwargs), metadata=_metadata(answer))
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(self, query: QueryType, nodes: List[NodeWithScore], additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
                          **response_kwargs: Any) -> RESPONSE_TYPE:
        if self._custom is not None:
            return await self._custom.asynthesize(query, nodes, additional_source_nodes, **response_kwargs)
        if self._streaming:  # a StreamingResponse over the sync stream, made without blocking the loop
            return await asyncio.to_thread(self.synthesize, query, nodes, additional_source_nodes, **response_kwargs)
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}) as event:
            answer = await self._llm.acomplete(query.query_str)
            response = Response(response=answer.text, source_nodes=_sources(answer.additional_kwargs), metadata=_metadata(answer))
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response


def _sources(extra: Dict[str, Any]) -> List[NodeWithScore]:
    return [citation_to_node(c) for c in extra.get("citations", [])]


def _metadata(answer: Any) -> Dict[str, Any]:
    """``mode``, ``stats`` (token counts, injected states, what retrieval touched) and ``timings`` of an LLM answer."""
    extra, usage = answer.additional_kwargs, (answer.raw or {}).get("usage", {})
    stats = {k: v for k, v in extra.items() if k not in ("citations", "timings", "model_name", "finish_reason", "mode")}
    stats.update(prompt_tokens=usage.get("prompt_tokens", 0), generated_tokens=usage.get("completion_tokens", 0))
    return {"mode": extra.get("mode"), "stats": stats, "timings": extra.get("timings", {})}


def _reading(llm: LLM, mode: str) -> LLM:
    """The LLM a LlamaIndex synthesizer prompts with passages: the SharedLLM over the index's selection in hybrid mode
    (its states injected: ``mode='latent'`` under the synthesizer's prompt), without a context in text mode."""
    if mode == "hybrid":
        return llm.model_copy(update={"mode": "latent"})
    return llm.model_copy(update={"context": None}) if hasattr(llm, "context") else llm


class SharedContextQueryEngine(RetrieverQueryEngine):
    """Query a `SharedContextIndex`: a `RetrieverQueryEngine` whose retriever walks the index's trees and whose answer
    reads the selected nodes as ``mode`` says.

    - ``mode="hybrid"`` (default, `sharedctx.config.DEFAULT_MODE`): the spans as passages in the prompt *and* their
      states injected; ``"text"``: the passages only; ``"latent"``: the states only, the question alone as the prompt.
    - Without response options the answer is the index's own (`ContextIndex.query(question, mode=...)`, the prompt
      the demo figures were measured with), through `SharedContextSynthesizer`. In ``text`` and ``hybrid`` modes the
      options of ``RetrieverQueryEngine.from_args`` apply: ``response_mode``, ``text_qa_template``,
      ``refine_template``, ``summary_template``, ``simple_template``, ``output_cls``, ``use_async``, ``verbose``,
      ``node_postprocessors`` and (text mode) ``response_synthesizer``: LlamaIndex's synthesizer then builds the
      prompt from the retrieved (and post-processed) nodes, and in hybrid mode the SharedLLM also injects the states
      the index selects for the query. ``filters`` (`MetadataFilters`) restrict the retrieved nodes in ``text``
      mode; latent and hybrid modes inject the index's own selection, which filters cannot restrict, so they refuse them.
    - ``llm``: a SharedLLM whose settings (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
      ``stop``, ``system_prompt``) the answers use (default: the index's, else ``Settings.llm`` when it is a SharedLLM
      over the same model, else defaults); the same names as keyword arguments override them. In text mode ``llm``
      may be any LlamaIndex LLM.
    - Retrieval (``similarity_top_k``: None, every selected node; ``top_k_chunks``; ``max_injected_states``) and
      the LLM call are reported to the callback manager and the instrumentation dispatcher in every mode, with exact
      token counts. Responses carry ``source_nodes`` (the nodes the answer read) and, from the default synthesizer,
      ``metadata`` with ``mode``, ``stats`` (``injected_states``, ``prompt_tokens``, ``chunks_encoded``, ...) and
      ``timings``. ``streaming=True`` returns a `StreamingResponse` whose ``source_nodes`` and ``metadata`` are filled
      when the stream ends.
    """

    def __init__(
        self,
        index: Any,
        *,
        mode: str = DEFAULT_MODE,
        llm: Any = None,
        streaming: bool = False,
        callback_manager: Optional[CallbackManager] = None,
        response_synthesizer: Optional[BaseSynthesizer] = None,
        node_postprocessors: Optional[List[Any]] = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        from llama_index.llms.sharedctx.base import GENERATION_FIELDS

        retriever_options = {k: kwargs.pop(k) for k in _RETRIEVER_OPTIONS if k in kwargs}
        generation = {k: kwargs.pop(k) for k in GENERATION_FIELDS if k in kwargs}
        response_options = {k: kwargs.pop(k) for k in _RESPONSE_OPTIONS if k in kwargs}
        if kwargs:
            raise TypeError(
                f"SharedContextQueryEngine got unknown options {sorted(kwargs)}; it takes mode, llm, streaming, callback_manager, "
                f"{', '.join(_RETRIEVER_OPTIONS)}, {', '.join(GENERATION_FIELDS)}, node_postprocessors, response_synthesizer and "
                f"(text and hybrid modes) {', '.join(_RESPONSE_OPTIONS)}"
            )
        shaping = sorted([*response_options, *(["node_postprocessors"] if node_postprocessors else []),
                          *(["response_synthesizer"] if response_synthesizer is not None else [])])
        if mode == "latent" and (shaping or retriever_options.get("filters") is not None):
            raise ValueError(f"{_LATENT_SUPPORTS}Got {shaping or ['filters']}: use mode='text' or 'hybrid' for them")
        if mode == "hybrid" and retriever_options.get("filters") is not None:
            raise ValueError(
                "filters restrict the retrieved nodes, but hybrid (and latent) mode injects the states the index itself "
                "selects for the query, which filters cannot restrict: use mode='text' with filters, or "
                "index.as_retriever(filters=...) with any LLM"
            )
        if mode == "hybrid" and response_synthesizer is not None:
            raise ValueError(
                "a response_synthesizer brings its own LLM, which would not inject the query's states: in hybrid mode pass "
                "response_mode / text_qa_template / ... and the engine builds the synthesizer around its SharedLLM; or use mode='text'"
            )
        self._index = index
        self.mode = mode
        self.streaming = streaming
        callback_manager = callback_manager or Settings.callback_manager
        lm = _engine_llm(index, llm, mode, generation, callback_manager)
        retriever_options.setdefault("similarity_top_k", None)
        retriever = SharedContextRetriever(index, callback_manager=callback_manager, **retriever_options)
        if response_synthesizer is None:
            if response_options or node_postprocessors or retriever_options.get("filters") is not None or not _is_shared(lm):
                if _is_shared(lm) and response_options.get("prompt_helper") is None:  # pack prompts by the model's own tokens
                    tokenizer = lm.get_llm()._require_tokenizer()
                    response_options["prompt_helper"] = PromptHelper.from_llm_metadata(
                        lm.metadata, tokenizer=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
                response_synthesizer = get_response_synthesizer(llm=_reading(lm, mode), streaming=streaming, callback_manager=callback_manager,
                                                                 **response_options)
            else:
                response_synthesizer = SharedContextSynthesizer(lm, mode, streaming=streaming, callback_manager=callback_manager)
        self.llm = lm
        super().__init__(retriever=retriever, response_synthesizer=response_synthesizer, node_postprocessors=node_postprocessors,
                         callback_manager=callback_manager)

    @dispatcher.span
    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        from llama_index.llms.sharedctx.base import selecting_for

        with selecting_for(self._index, query_bundle.query_str):  # a synthesizer's prompt is not the question
            return super()._query(query_bundle)

    @dispatcher.span
    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        from llama_index.llms.sharedctx.base import selecting_for

        with selecting_for(self._index, query_bundle.query_str):
            return await super()._aquery(query_bundle)


def _is_shared(llm: Any) -> bool:
    from llama_index.llms.sharedctx import SharedLLM

    return isinstance(llm, SharedLLM)


def _engine_llm(index: Any, llm: Any, mode: str, generation: Dict[str, Any], callback_manager: CallbackManager) -> LLM:
    """The LLM the engine answers with: a copy of the chosen SharedLLM reading this index in ``mode``, with the
    generation options given to the engine over its own settings (a foreign LLM, text mode only, as it is)."""
    import sharedctx
    from llama_index.llms.sharedctx import SharedLLM

    if llm is None:
        configured = getattr(Settings, "_llm", None)  # not Settings.llm: that would build LlamaIndex's default LLM
        llm = index.llm_settings or (configured if isinstance(configured, SharedLLM) and configured.llm is index.llm else None)
    if isinstance(llm, sharedctx.SharedLLM):
        llm = SharedLLM(llm=llm)
    if llm is None:
        llm = SharedLLM(llm=index.llm)
    if not isinstance(llm, SharedLLM):
        if mode != "text" or not isinstance(llm, LLM):
            raise ValueError(
                f"{mode} mode reads the selected states with a SharedLLM over this index's model, got {type(llm).__name__}: "
                "pass llm=None or a llama_index.llms.sharedctx.SharedLLM; any LlamaIndex LLM works with mode='text'"
            )
        if generation:
            raise ValueError(f"{sorted(generation)} are SharedLLM settings; set them on your {type(llm).__name__}")
        return llm
    if llm.get_llm() is not index.llm:
        raise ValueError("as_query_engine(llm=...) must read with this index's model: SharedLLM(llm=index.llm); use mode='text' or as_retriever() with other models")
    update = {**generation, "context": index, "mode": mode, "callback_manager": callback_manager}
    if "stop" in update:
        update["stop"] = [update["stop"]] if isinstance(update["stop"], str) else list(update["stop"] or [])
    return llm.model_copy(update=update)
