"""The query engine in each mode, on the real llama-index-core engine and a tiny model: the defaults (lexical walk,
hybrid answers), RetrieverQueryEngine's options (response modes, templates, synthesizers, node postprocessors),
metadata filters, the LLM's settings, prompts, and retrieval and LLM events in the instrumentation."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional

import pytest
from llama_index.core import PromptTemplate, Settings
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import MockLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores import FilterOperator, MetadataFilter, MetadataFilters

from conftest import DOCS, Spy, documents
from llama_index.indices.sharedctx import SharedContextIndex, SharedContextQueryEngine
from llama_index.llms.sharedctx import SharedLLM
from sharedctx.config import DEFAULT_MODE, DEFAULT_POLICY

QUESTION = "What colour is the lantern of the Harrow Point light?"
MODES = ("latent", "text", "hybrid")


def passages_in(llm, call) -> str:
    """The text of a prompt the model was given (ids decoded, or the string itself)."""
    prompt = call["prompt"]
    return prompt if isinstance(prompt, str) else llm.tokenizer.decode(list(prompt))


# ---------------------------------------------------------------------- defaults
def test_defaults_are_the_lexical_walk_and_hybrid_answers(index, llm):
    assert DEFAULT_POLICY == "lexical" and DEFAULT_MODE == "hybrid"
    assert index.context_index.policy == DEFAULT_POLICY  # built without naming a policy
    assert index.as_query_engine().mode == DEFAULT_MODE
    assert SharedLLM(llm=llm).mode == DEFAULT_MODE
    assert inspect.signature(SharedContextQueryEngine).parameters["mode"].default == DEFAULT_MODE


@pytest.mark.parametrize("mode", MODES)
def test_default_engine_gives_the_index_answer(index, llm, mode):
    response = index.as_query_engine(mode=mode, max_new_tokens=6).query(QUESTION)
    answer = index.context_index.query(QUESTION, mode=mode, max_new_tokens=6)
    assert isinstance(response, Response) and response.response == answer.text
    assert [n.node.node_id for n in response.source_nodes] == [f"{c.doc_id}#{c.chunk}/{c.level}/{c.index}" for c in answer.citations]
    assert response.metadata["mode"] == mode
    assert response.metadata["stats"]["injected_states"] == answer.stats.injected_states
    assert (answer.stats.injected_states > 0) == (mode != "text")


def test_hybrid_prompts_the_passages_and_injects_their_states(index, llm):
    with Spy(llm) as spy:
        response = index.as_query_engine(max_new_tokens=4).query(QUESTION)
    (call,) = spy.calls
    assert call["injection"] is not None and call["injection"].n_states == response.metadata["stats"]["injected_states"] > 0
    text = passages_in(llm, call)
    assert QUESTION in text and "[1]" in text
    best = max(response.source_nodes, key=lambda n: n.score)
    assert best.node.text.strip() in text


# ---------------------------------------------------------------------- RetrieverQueryEngine's options
def test_response_options_build_a_llamaindex_synthesizer(index, llm):
    template = PromptTemplate("PASSAGES:\n{context_str}\nASK: {query_str}\n")
    for mode in ("text", "hybrid"):
        engine = index.as_query_engine(mode=mode, response_mode="compact", text_qa_template=template, max_new_tokens=4)
        assert isinstance(engine, RetrieverQueryEngine)
        with Spy(llm) as spy:
            response = engine.query(QUESTION)
        assert len(spy.calls) == 1 and "ASK: " + QUESTION in passages_in(llm, spy.calls[0])
        assert response.source_nodes and all("level" in n.node.metadata for n in response.source_nodes)
        if mode == "hybrid":  # the states the index selects for the query, not for the synthesizer's prompt
            selected = index.context_index.query(QUESTION, mode="latent", max_new_tokens=1).stats.injected_states
            assert spy.calls[0]["injection"].n_states == selected > 0
        else:
            assert spy.calls[0]["injection"] is None
        # the citation fields never reach the prompt; the document's own metadata does
        assert "chunk_score" not in passages_in(llm, spy.calls[0])


def test_response_modes(index, llm):
    for response_mode in ("refine", "simple_summarize", "tree_summarize", "accumulate", "compact_accumulate"):
        response = index.as_query_engine(mode="text", response_mode=response_mode, similarity_top_k=2, max_new_tokens=2).query(QUESTION)
        assert len(response.source_nodes) == 2, response_mode


class OnlyDocument(BaseNodePostprocessor):
    ref: str

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        return [n for n in nodes if n.node.metadata["ref_doc_id"] == self.ref]


def test_node_postprocessors_shape_the_passages(index, llm):
    question = "The lantern burns green; the night train to Oslo leaves at nine"
    nodes = index.as_retriever(similarity_top_k=None).retrieve(question)
    refs = sorted({n.node.metadata["ref_doc_id"] for n in nodes})
    assert len(refs) >= 2  # without the postprocessor the passages come from several documents
    keep = refs[0]
    others = [n.node.text for n in nodes if n.node.metadata["ref_doc_id"] != keep and len(n.node.text) >= 8 and n.node.text not in question]
    engine = index.as_query_engine(mode="text", node_postprocessors=[OnlyDocument(ref=keep)], max_new_tokens=2)
    with Spy(llm) as spy:
        response = engine.query(question)
    assert response.source_nodes and {n.node.metadata["ref_doc_id"] for n in response.source_nodes} == {keep}
    assert others and not any(text in passages_in(llm, spy.calls[0]) for text in others)


def test_response_synthesizer_in_text_mode(index, llm):
    synth = get_response_synthesizer(llm=SharedLLM(llm=llm, max_new_tokens=3), response_mode="compact")
    response = index.as_query_engine(mode="text", response_synthesizer=synth).query(QUESTION)
    assert response.source_nodes and isinstance(response.response, str)
    with pytest.raises(ValueError, match="brings its own LLM"):
        index.as_query_engine(mode="hybrid", response_synthesizer=synth)


def test_latent_mode_says_what_it_supports(index):
    for options in ({"response_mode": "refine"}, {"text_qa_template": PromptTemplate("{context_str}{query_str}")},
                    {"node_postprocessors": [OnlyDocument(ref="harrow")]}):
        with pytest.raises(ValueError, match="latent mode reads the selected nodes as injected states.*supports streaming"):
            index.as_query_engine(mode="latent", **options)
    with pytest.raises(TypeError, match="unknown options.*response_mode"):
        index.as_query_engine(mode="text", respnse_mode="refine")


def test_any_llm_in_text_mode(index):
    response = index.as_query_engine(mode="text", llm=MockLLM(max_tokens=3)).query(QUESTION)
    assert response.source_nodes and response.response.strip()
    for mode in ("latent", "hybrid"):
        with pytest.raises(ValueError, match="any LlamaIndex LLM works with mode='text'"):
            index.as_query_engine(mode=mode, llm=MockLLM())


# ---------------------------------------------------------------------- filters
def test_metadata_filters_on_the_retriever(index):
    only_bread = MetadataFilters(filters=[MetadataFilter(key="topic", value="bread")])
    nodes = index.as_retriever(similarity_top_k=3, filters=only_bread).retrieve(QUESTION)
    assert len(nodes) == 3 and {n.node.metadata["ref_doc_id"] for n in nodes} == {"bread"}  # walks past the best chunks
    not_harrow = MetadataFilters(filters=[MetadataFilter(key="ref_doc_id", value=["harrow"], operator=FilterOperator.NIN)])
    assert {n.node.metadata["ref_doc_id"] for n in index.as_retriever(similarity_top_k=6, filters=not_harrow).retrieve(QUESTION)} <= {"bread", "trains"}
    response = index.as_query_engine(mode="text", filters=only_bread, max_new_tokens=2).query(QUESTION)
    assert response.source_nodes and {n.node.metadata["ref_doc_id"] for n in response.source_nodes} == {"bread"}
    for mode in ("latent", "hybrid"):
        with pytest.raises(ValueError, match="filters"):
            index.as_query_engine(mode=mode, filters=only_bread)
    with pytest.raises(TypeError, match="MetadataFilters"):
        index.as_retriever(filters={"topic": "bread"})
    with pytest.raises(TypeError, match="unknown options"):
        index.as_retriever(vector_store_query_mode="hybrid")


# ---------------------------------------------------------------------- the LLM's settings
def test_the_llm_settings_are_honoured(llm):
    built_with = SharedLLM(llm=llm, max_new_tokens=5)
    idx = SharedContextIndex.from_documents(documents()[:2], llm=built_with)
    stats = idx.as_query_engine().query(QUESTION).metadata["stats"]
    assert stats["generated_tokens"] == 5
    assert idx.as_query_engine(max_new_tokens=3).query(QUESTION).metadata["stats"]["generated_tokens"] == 3
    assert idx.as_query_engine(llm=SharedLLM(llm=llm, max_new_tokens=2)).query(QUESTION).metadata["stats"]["generated_tokens"] == 2
    previous = Settings._llm
    try:
        Settings.llm = SharedLLM(llm=llm, max_new_tokens=4)
        plain = SharedContextIndex.from_documents(documents()[:2], llm=llm)  # built from the model, not a SharedLLM
        assert plain.as_query_engine().query(QUESTION).metadata["stats"]["generated_tokens"] == 4
    finally:
        Settings._llm = previous


# ---------------------------------------------------------------------- prompts
def test_prompts_can_be_read_and_replaced(index, llm):
    engine = index.as_query_engine(mode="hybrid", max_new_tokens=3)
    prompts = engine.get_prompts()
    assert set(prompts) == {"response_synthesizer:text_qa_template"}
    assert "Answer the question using the context passages" in prompts["response_synthesizer:text_qa_template"].get_template()
    engine.update_prompts({"response_synthesizer:text_qa_template": PromptTemplate("NOTES {context_str} Q {query_str}")})
    with Spy(llm) as spy:
        engine.query(QUESTION)
    assert "Q " + QUESTION in passages_in(llm, spy.calls[0]) and spy.calls[0]["injection"].n_states > 0
    assert "NOTES" in engine.get_prompts()["response_synthesizer:text_qa_template"].get_template()
    latent = index.as_query_engine(mode="latent")
    assert latent.get_prompts() == {}
    with pytest.raises(ValueError, match="latent mode has no prompt template"):
        latent.update_prompts({"response_synthesizer:text_qa_template": PromptTemplate("{query_str}")})


# ---------------------------------------------------------------------- instrumentation
class Recorder(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(type(event).__name__)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("streaming", [False, True])
def test_retrieval_and_llm_events_in_every_mode(index, mode, streaming):
    recorder = Recorder(events=[])
    root = get_dispatcher()
    root.add_event_handler(recorder)
    debug, counter = LlamaDebugHandler(), TokenCountingHandler(tokenizer=lambda text: [0])
    try:
        engine = index.as_query_engine(mode=mode, streaming=streaming, max_new_tokens=3, callback_manager=CallbackManager([debug, counter]))
        response = engine.query(QUESTION)
        if streaming:
            assert isinstance(response, StreamingResponse)
            "".join(response.response_gen)
    finally:
        root.event_handlers.remove(recorder)
    for name in ("QueryStartEvent", "RetrievalStartEvent", "RetrievalEndEvent", "SynthesizeStartEvent", "LLMCompletionStartEvent",
                 "LLMCompletionEndEvent", "QueryEndEvent"):
        assert name in recorder.events, (mode, streaming, name, recorder.events)
    assert debug.get_event_pairs(CBEventType.RETRIEVE) and debug.get_event_pairs(CBEventType.LLM)
    assert counter.completion_llm_token_count == response.metadata["stats"]["generated_tokens"] > 0


async def test_async_hybrid_with_a_template_injects(index, llm):
    engine = index.as_query_engine(mode="hybrid", text_qa_template=PromptTemplate("{context_str}\n{query_str}"), max_new_tokens=3)
    with Spy(llm) as spy:
        response = await engine.aquery(QUESTION)
    assert spy.calls[0]["injection"] is not None and response.source_nodes
    default = index.as_query_engine(max_new_tokens=4)
    assert (await default.aquery(QUESTION)).response == default.query(QUESTION).response


# ---------------------------------------------------------------------- inputs
def test_a_prompt_that_is_not_text_is_refused(llm):
    lm = SharedLLM(llm=llm, max_new_tokens=2)
    for bad, name in ((None, "NoneType"), (42, "int")):
        with pytest.raises(TypeError, match=f"must be a string, got {name}"):
            lm.complete(bad)
        with pytest.raises(TypeError, match=f"must be a string, got {name}"):
            lm.stream_complete(bad)
