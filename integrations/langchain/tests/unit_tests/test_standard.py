"""langchain-tests' standard unit suite for chat models, on a tiny random SharedLLM."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_sharedctx import ChatSharedLLM
from sharedctx.testing import make_llm

_LLM = make_llm(gates=1.0)


class TestChatSharedLLMStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSharedLLM]:
        return ChatSharedLLM

    @property
    def chat_model_params(self) -> dict:
        return {"llm": _LLM}

    @property
    def returns_usage_metadata(self) -> bool:
        return True
