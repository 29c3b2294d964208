"""Contracts: class hierarchy, LangChain entry points overridden, signatures, and the public API only."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from langchain_core.language_models import BaseChatModel

import langchain_sharedctx
from langchain_sharedctx import ChatSharedLLM

PACKAGE = Path(langchain_sharedctx.__file__).parent


def test_public_names():
    assert set(langchain_sharedctx.__all__) >= {"ChatSharedLLM"}
    for name in langchain_sharedctx.__all__:
        assert hasattr(langchain_sharedctx, name)


def test_chat_model_hierarchy_and_overrides():
    assert issubclass(ChatSharedLLM, BaseChatModel)
    for name in ("_generate", "_stream", "_agenerate", "_astream", "_llm_type", "_identifying_params", "_get_ls_params"):
        assert getattr(ChatSharedLLM, name) is not getattr(BaseChatModel, name), name
    assert inspect.iscoroutinefunction(ChatSharedLLM._agenerate)
    assert inspect.isasyncgenfunction(ChatSharedLLM._astream)


def test_chat_model_signatures_match_base():
    for name in ("_generate", "_stream", "_agenerate", "_astream"):
        mine = inspect.signature(getattr(ChatSharedLLM, name))
        base = inspect.signature(getattr(BaseChatModel, name))
        assert list(mine.parameters) == list(base.parameters), name
        for p in ("stop", "run_manager"):
            assert mine.parameters[p].default is None


def test_fields_and_aliases():
    fields = ChatSharedLLM.model_fields
    for name in ("llm", "model_name", "adapter", "context", "temperature", "max_tokens", "top_k", "top_p", "seed", "stop", "streaming"):
        assert name in fields, name
    assert fields["model_name"].alias == "model"
    chat = ChatSharedLLM(model="some/model", max_new_tokens=7, stop_sequences=["x"])
    assert (chat.model_name, chat.max_tokens, chat.stop) == ("some/model", 7, ["x"])


def _sharedctx_imports():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sharedctx":
                yield path, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "sharedctx":
                        yield path, a.name, []


def test_imports_only_public_sharedctx_api():
    import importlib

    seen = 0
    for path, module, names in _sharedctx_imports():
        mod = importlib.import_module(module)
        for name in names:
            assert not name.startswith("_"), (path, module, name)
            assert name in getattr(mod, "__all__", ()), f"{path.name} imports {module}.{name}, which is not in its __all__"
        seen += 1
    assert seen >= 1


def test_import_is_light():
    """Importing the package must not import torch (sharedctx loads on first use)."""
    code = "import sys, langchain_sharedctx; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
