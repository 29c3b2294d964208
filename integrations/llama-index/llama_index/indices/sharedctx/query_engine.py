"""SharedContextQueryEngine: answers that read the selected tree nodes as injected states (the stock
RetrieverQueryEngine would hand the LLM only their text)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterator, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.callbacks.base import EventContext
from llama_index.core.schema import NodeWithScore, QueryBundle

from .retriever import citation_to_node

__all__ = ["SharedContextQueryEngine"]

_MODES = ("latent", "text", "hybrid")


class SharedContextQueryEngine(BaseQueryEngine):
    """Query a `SharedContextIndex`: select nodes for the question and answer with the index's SharedLLM.

    ``mode="latent"`` (default) injects the selected nodes' stored states and puts only the question in the
    prompt; ``"text"`` pastes their spans into the prompt instead; ``"hybrid"`` does both. With ``streaming=True``
    `query` returns a `StreamingResponse` whose ``source_nodes`` and ``metadata`` are filled when the stream ends.
    Responses carry ``source_nodes`` (the injected nodes as `NodeWithScore`s) and ``metadata`` (``stats`` with
    ``injected_states``, ``chunks_encoded``, ``chunks_cached``..., and ``timings``). An LLM event with exact token
    counts is reported to the callback manager, so `TokenCountingHandler` counts these answers too.
    """

    def __init__(
        self,
        index: Any,
        *,
        mode: str = "latent",
        streaming: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Optional[int] = None,
        stop: Optional[List[str]] = None,
        top_k_chunks: Optional[int] = None,
        max_injected_states: Optional[int] = None,
        callback_manager: Optional[CallbackManager] = None,
        **kwargs: Any,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        unknown = sorted(set(kwargs) - {"similarity_top_k"})  # as_retriever()'s option, harmless here
        if unknown:
            raise TypeError(f"SharedContextQueryEngine got unknown options {unknown}")
        self._index = index
        self.mode = mode
        self.streaming = streaming
        self._generation = {
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "stop": list(stop or [])
        }
        self._top_k_chunks = top_k_chunks
        self._max_injected_states = max_injected_states
        super().__init__(callback_manager=callback_manager)

    def _get_prompt_modules(self) -> Dict[str, Any]:
        return {}

    def _run(self, question: str, stats: Dict[str, Any]) -> Iterator[str]:
        return self._index.context_index.stream(
            question,
            mode=self.mode,
            top_k_chunks=self._top_k_chunks,
            max_injected_states=self._max_injected_states,
            stats=stats,
            **self._generation,
        )

    def _finish(self, question: str, text: str, stats: Dict[str, Any], event: Any) -> tuple[List[NodeWithScore], Dict[str, Any]]:
        citations = stats.pop("citations", [])
        timings = stats.pop("timings", {})
        stats.pop("token_ids", None)
        sources = [citation_to_node(c) for c in citations]
        usage = {"prompt_tokens": stats.get("prompt_tokens", 0), "completion_tokens": stats.get("generated_tokens", 0)}
        event.on_end(payload={EventPayload.PROMPT: question, EventPayload.COMPLETION: CompletionResponse(text=text, raw={"usage": usage})})
        return sources, {"mode": self.mode, "stats": stats, "timings": timings}

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        question = query_bundle.query_str
        with self.callback_manager.event(CBEventType.QUERY, payload={EventPayload.QUERY_STR: question}) as query_event:
            stats: Dict[str, Any] = {}
            llm_event = EventContext(self.callback_manager, CBEventType.LLM)  # ends when the answer is complete
            llm_event.on_start(payload={EventPayload.PROMPT: question})
            if self.streaming:
                response = StreamingResponse(response_gen=iter(()), source_nodes=[], metadata={})

                def gen() -> Iterator[str]:
                    text = ""
                    for delta in self._run(question, stats):
                        text += delta
                        yield delta
                    sources, metadata = self._finish(question, text, stats, llm_event)
                    response.source_nodes.extend(sources)
                    response.metadata.update(metadata)

                response.response_gen = gen()
            else:
                text = "".join(self._run(question, stats))
                sources, metadata = self._finish(question, text, stats, llm_event)
                response = Response(response=text, source_nodes=sources, metadata=metadata)
            query_event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return await asyncio.get_running_loop().run_in_executor(None, self._query, query_bundle)
