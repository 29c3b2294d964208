"""Contracts: class hierarchy, overridden entry points, PEP 420 namespaces, and only sharedctx's public API."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.indices.base import BaseIndex
from llama_index.core.llms import LLM, CustomLLM

import llama_index.indices.sharedctx as indices_pkg
import llama_index.llms.sharedctx as llms_pkg
from llama_index.indices.sharedctx import SharedContextIndex, SharedContextQueryEngine, SharedContextRetriever
from llama_index.llms.sharedctx import SharedLLM

ROOT = Path(llms_pkg.__file__).parents[3]  # the distribution's folder holding llama_index/


def test_hierarchy():
    assert issubclass(SharedLLM, CustomLLM) and issubclass(SharedLLM, LLM)
    assert issubclass(SharedContextIndex, BaseIndex)
    assert issubclass(SharedContextRetriever, BaseRetriever)
    assert issubclass(SharedContextQueryEngine, BaseQueryEngine)


def test_llm_entry_points_are_implemented():
    for name in ("complete", "stream_complete", "chat", "stream_chat", "acomplete", "achat", "astream_complete", "astream_chat"):
        assert getattr(SharedLLM, name) is not getattr(CustomLLM, name), name
    assert isinstance(inspect.getattr_static(SharedLLM, "metadata"), property)
    for name in ("acomplete", "achat", "astream_complete", "astream_chat"):
        assert inspect.iscoroutinefunction(getattr(SharedLLM, name)), name
    # llama-index's callback decorators hide signatures; the code under them takes (prompt, formatted=False, **kw)
    import llama_index.llms.sharedctx.base as module

    cls = next(n for n in ast.parse(Path(module.__file__).read_text()).body if isinstance(n, ast.ClassDef) and n.name == "SharedLLM")
    defs = {f.name: f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for name in ("complete", "stream_complete", "acomplete", "astream_complete"):
        args = defs[name].args
        assert [a.arg for a in args.args] == ["self", "prompt", "formatted"] and ast.literal_eval(args.defaults[0]) is False, name
        assert args.kwarg is not None and any(ast.unparse(d).startswith("llm_completion_callback") for d in defs[name].decorator_list)
    for name in ("chat", "stream_chat", "achat", "astream_chat"):
        assert [a.arg for a in defs[name].args.args] == ["self", "messages"], name
        assert any(ast.unparse(d).startswith("llm_chat_callback") for d in defs[name].decorator_list)


def test_index_entry_points_are_implemented():
    for name in ("_build_index_from_nodes", "_insert", "_delete_node", "as_retriever", "as_query_engine", "insert", "from_documents"):
        assert getattr(SharedContextIndex, name) is not getattr(BaseIndex, name, None), name
    assert isinstance(inspect.getattr_static(SharedContextIndex, "ref_doc_info"), property)
    assert callable(SharedContextIndex.persist) and callable(SharedContextIndex.from_persist_dir)
    params = inspect.signature(SharedContextIndex.from_documents).parameters
    assert "show_progress" in params and "transformations" in params
    assert SharedContextRetriever._retrieve is not BaseRetriever._retrieve
    assert SharedContextQueryEngine._query is not BaseQueryEngine._query


def test_pep420_namespaces():
    for ns in ("llama_index", "llama_index.llms", "llama_index.indices"):
        assert not (ROOT / ns.replace(".", "/") / "__init__.py").exists(), ns
    assert (ROOT / "llama_index/llms/sharedctx/__init__.py").exists()
    assert (ROOT / "llama_index/indices/sharedctx/__init__.py").exists()
    import llama_index.core  # the namespace is shared with llama-index-core

    assert hasattr(importlib.import_module("llama_index"), "__path__")
    assert set(llms_pkg.__all__) == {"SharedLLM"}
    assert {"SharedContextIndex", "SharedContextRetriever", "SharedContextQueryEngine"} <= set(indices_pkg.__all__)


def test_imports_only_public_sharedctx_api():
    seen = 0
    for path in (ROOT / "llama_index").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sharedctx":
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert alias.name in getattr(mod, "__all__", ()), f"{path.name}: {node.module}.{alias.name} is not public"
                seen += 1
    assert seen >= 2


def test_import_is_light():
    code = "import sys, llama_index.llms.sharedctx, llama_index.indices.sharedctx; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_load_through_the_shared_loader():
    """No model loader of its own: models come from sharedctx.contexts (holder_llm / load_llm), shared with LangChain's."""
    for path in (ROOT / "llama_index").rglob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("shared", "from_pretrained")]
        defs = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and "load" in n.name]
        assert not calls and not defs, (path.name, defs)
