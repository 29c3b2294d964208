"""LCEL compositions: retrieved context read as prompt text and injected states together (`create_hybrid_chain`, the
default way `ChatSharedLLM` reads an index), as injected states only (`create_latent_chain`), or as prompt text for
any chat model (`create_text_chain`). Each takes a question and returns ``{"question", "context", "answer"}``."""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Sequence

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from .chat_models import ChatSharedLLM
from .retrievers import SharedContextRetriever

__all__ = ["create_hybrid_chain", "create_latent_chain", "create_text_chain", "format_documents", "LATENT_PROMPT", "TEXT_PROMPT"]

#: the latent chain's prompt: only the question; the context arrives as injected states
LATENT_PROMPT = ChatPromptTemplate.from_messages([("human", "{question}")])
#: the text chain's prompt: the retrieved passages are pasted in as text
TEXT_PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer the question using the context passages.\n\n{context}"), ("human", "{question}")]
)


def format_documents(docs: Sequence[Document]) -> str:
    """Numbered passages ``[i] (doc_id) text``, in the order given."""
    parts = []
    for i, doc in enumerate(docs, 1):
        source = doc.metadata.get("doc_id") or doc.metadata.get("source")
        parts.append(f"[{i}] ({source}) {doc.page_content.strip()}" if source else f"[{i}] {doc.page_content.strip()}")
    return "\n\n".join(parts)


def _as_question(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"question": value}
    if isinstance(value, dict) and "question" in value:
        return value
    raise TypeError(f"the chain takes a question string or a dict with a 'question' key, got {type(value).__name__}")


def _injecting_chain(chat: ChatSharedLLM, retriever: BaseRetriever, prompt: ChatPromptTemplate, mode: str, name: str) -> Runnable:
    """The latent and hybrid compositions: ``chat`` reads the retriever's selection as ``mode`` says (a `ContextIndex`
    behind a `SharedContextRetriever` selects and reads its own nodes; other retrievers' Documents are injected)."""
    if not isinstance(chat, ChatSharedLLM):
        raise TypeError(f"latent injection needs a ChatSharedLLM, got {type(chat).__name__}; use create_text_chain for other chat models")
    index = retriever.index if isinstance(retriever, SharedContextRetriever) else None
    if index is not None and index.llm is not chat.get_llm():
        raise ValueError("the retriever's ContextIndex was built with another SharedLLM; build ChatSharedLLM(llm=index.llm)")
    passages = RunnablePassthrough.assign(context=lambda inputs: format_documents(inputs["context"]))

    def answer(inputs: dict[str, Any]) -> Runnable:
        bound = chat.bind(context=index, mode=mode) if index is not None else chat.bind(context=list(inputs["context"]))
        return passages | prompt | bound

    return (
        RunnableLambda(_as_question)
        | RunnablePassthrough.assign(context=itemgetter("question") | retriever)
        | RunnablePassthrough.assign(answer=RunnableLambda(answer))
    ).with_config(run_name=name)


def create_hybrid_chain(chat: ChatSharedLLM, retriever: BaseRetriever, *, prompt: ChatPromptTemplate | None = None) -> Runnable:
    """``question -> {"question", "context": [Document], "answer": AIMessage}`` where the answer reads the retrieved
    context **both** as prompt text and as injected states: the way `ChatSharedLLM` reads an index by default
    (``mode="hybrid"``, `sharedctx.config.DEFAULT_MODE`).

    With a `SharedContextRetriever` the answer is the index's own hybrid answer (`ContextIndex.query(question,
    mode="hybrid")`: the selected spans as numbered passages, their stored states injected; ``prompt``, when given,
    is the conversation whose last user message gets the passages) and ``response_metadata["citations"]`` lists the
    nodes read. With any other retriever, the Documents are formatted into ``prompt`` (default `TEXT_PROMPT`,
    variables ``context`` and ``question``) and also encoded into a context tree and injected.
    """
    default = LATENT_PROMPT if isinstance(retriever, SharedContextRetriever) else TEXT_PROMPT  # the index adds its passages itself
    return _injecting_chain(chat, retriever, prompt or default, "hybrid", "sharedctx_hybrid_chain")


def create_latent_chain(chat: ChatSharedLLM, retriever: BaseRetriever, *, prompt: ChatPromptTemplate | None = None) -> Runnable:
    """``question -> {"question", "context": [Document], "answer": AIMessage}`` where the answer reads the retrieved
    context as **injected states** only: the prompt holds only ``prompt`` (default: the question).

    With a `SharedContextRetriever`, the model injects the stored states of the nodes its `ContextIndex` selects
    for the question (the same traversal that produced ``context``; nothing is encoded again), and the answer's
    ``response_metadata["citations"]`` lists them. With any other retriever, the retrieved Documents are encoded
    into a context tree (once per distinct set of Documents) and injected. (An adapter reads injected states well
    enough to answer from them alone only once trained to: until then `create_hybrid_chain` is the one that answers.)
    """
    if prompt is not None and "context" in prompt.input_variables:
        raise ValueError("create_latent_chain's prompt holds the question only ({context} would paste the passages as text); use create_hybrid_chain")
    return _injecting_chain(chat, retriever, prompt or LATENT_PROMPT, "latent", "sharedctx_latent_chain")


def create_text_chain(chat: BaseChatModel, retriever: BaseRetriever, *, prompt: ChatPromptTemplate | None = None) -> Runnable:
    """``question -> {"question", "context": [Document], "answer": AIMessage}`` for **any** chat model: the retrieved
    passages are formatted (`format_documents`) into ``prompt`` (default `TEXT_PROMPT`, variables ``context`` and
    ``question``) as plain text."""
    prompt = prompt or TEXT_PROMPT
    answer = RunnablePassthrough.assign(context=lambda inputs: format_documents(inputs["context"])) | prompt | chat
    return (
        RunnableLambda(_as_question)
        | RunnablePassthrough.assign(context=itemgetter("question") | retriever)
        | RunnablePassthrough.assign(answer=answer)
    ).with_config(run_name="sharedctx_text_chain")
