"""ContextIndex: many documents as a forest of chunk trees in a TreeStore; add, delete, retrieve, query.

A document is cut into chunks by content-defined boundaries (`sharedctx.chunking`), every node of every chunk's
tree is encoded once and kept in the store under the chunk's content address, and a query

1. scores every chunk root of every document against the query key (cosine),
2. keeps the best chunks within ``top_k`` and a budget of injected states,
3. walks each kept tree under the model's policy (optionally expanding both children when their scores are
   within ``expand_margin``),

and then answers by injecting the preserved nodes' states (``latent``), by putting their text into the prompt
(``text``, usable with any LLM through `retrieve`), or both (``hybrid``). Every injected state maps back to a
`Citation`: document, chunk, node, character span, score and text.

On disk, ``DIR/nodes`` is the size-limited `TreeStore` and ``DIR/docs`` the document table (token ids, offsets,
text, chunk boundaries and root keys of each document, one checked safetensors blob per document, never evicted).
Both are diskcache directories, so several processes may build into one index at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .chunking import chunk_text
from .config import POLICIES
from .documents import __all__ as _DOCUMENT_NAMES
from .documents import (
    AddResult,
    Answer,
    BuildReport,
    Citation,
    DocumentInfo,
    DocumentNotFoundError,
    DocumentTable,
    _Doc,
    _iter_files,
    _looks_like_path,
    read_document,
)
from .errors import InputError
from .generation import SAMPLING_FIELDS, MicroBatcher, SamplingOptions
from .model import SharedLLM
from .ops.sampling import sample_indices
from .ops.scoring import BM25, cosine_scores
from .policy import make_chooser, rank_chunks, walk_trees
from .store import DEFAULT_SIZE_LIMIT, StoreError, TreeStore
from .tree import NodeStates, canonical_children

__all__ = ["ContextIndex", *_DOCUMENT_NAMES]  # the index and the document types it returns

logger = logging.getLogger(__name__)

MODES = ("latent", "text", "hybrid")
_FORMAT = "sharedctx-index-1"
_TEXT_PROMPT = "Answer the question using the context passages.\n\n{passages}\n\nQuestion: {question}"


# ---------------------------------------------------------------------- the index
class ContextIndex:
    """Documents as a forest of chunk trees, encoded once into a `TreeStore`, queried many times.

    Args:
        llm: the `SharedLLM` that encodes and reads.
        store: the index directory (created private); None makes a temporary one, removed with the index.
        size_limit: bytes the node store may take before evicting least recently used chunks (evicted chunks
            are encoded again when a query needs them).
        top_k: chunks injected per query at most.
        max_injected_states: budget of injected states per query (None: no budget beyond ``top_k``).
        expand_margin: with the ``query`` (``lexical``) policy, expand both children when their cosine (BM25) scores differ by at
            most this much (None: always one child, as the paper).
        batch_chunks: chunks encoded per batch while building (memory is bounded by this, not the document).
        min_fill: chunks close at a content-defined boundary once this fraction of ``chunk_size`` is filled.
        max_batch_queries: `query` calls made at the same time from several threads share one batched forward
            (prefill and decoding), at most this many per batch; 1 runs each call on its own.
        batch_wait_s: how long a query arriving at an idle model waits for others to share its batch.
        policy: how chunks are ranked and trees walked for a question (default: the model's ``config.policy``).
            ``lexical`` ranks chunks and expands children by BM25 of their text for the question's words;
            ``query`` by cosine of hidden-state keys (the paper's); ``right``/``left``/``random`` rank by keys and
            walk blindly. `benchmarks/bench_selection.py` measures how often each puts the answer's chunk first.
        encode: ``eager`` runs the lower model over every chunk as it is added (the paper's "encode once, query
            many times"); ``lazy`` (with the ``lexical`` policy, which needs no keys) adds only the text and
            encodes a chunk the first time a ``latent`` or ``hybrid`` query injects it, so building an index for
            `retrieve` and ``text`` mode costs tokenising only. Chunks encoded later are stored like any other.
    """

    def __init__(
        self,
        llm: SharedLLM,
        store: str | os.PathLike | None = None,
        *,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        top_k: int = 8,
        max_injected_states: int | None = None,
        expand_margin: float | None = None,
        batch_chunks: int = 16,
        min_fill: float = 0.75,
        max_batch_queries: int = 8,
        batch_wait_s: float = 0.002,
        policy: str | None = None,
        encode: str = "eager",
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if batch_chunks < 1:
            raise ValueError(f"batch_chunks must be >= 1, got {batch_chunks}")
        if max_batch_queries < 1:
            raise ValueError(f"max_batch_queries must be >= 1, got {max_batch_queries}")
        policy = llm.config.policy if policy is None else policy
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if expand_margin is not None and policy not in ("query", "lexical"):
            raise ValueError(f"expand_margin needs the 'query' or 'lexical' policy, not {policy!r}")
        self.policy = policy
        if encode not in ("eager", "lazy"):
            raise ValueError(f"encode must be 'eager' or 'lazy', got {encode!r}")
        if encode == "lazy" and policy != "lexical":
            raise ValueError(
                f"encode='lazy' needs policy='lexical': the {policy!r} policy ranks chunks by keys that only encoding "
                "makes; use encode='eager' with it"
            )
        self.encode = encode
        if llm.tokenizer is None:
            raise ValueError("a ContextIndex needs a SharedLLM with a tokenizer (documents are text)")
        self.llm = llm
        self._tmp = tempfile.TemporaryDirectory(prefix="sharedctx-index-") if store is None else None
        self.directory = Path(self._tmp.name if self._tmp else store)
        self.top_k = top_k
        self.max_injected_states = max_injected_states
        self.expand_margin = expand_margin
        self.batch_chunks = batch_chunks
        self.min_fill = min_fill
        self.signature = llm.config.lower_signature()
        self.fingerprint = llm.fingerprint
        self.table = DocumentTable(self.directory)
        os.chmod(self.directory, 0o700)
        self.table.bind(self._manifest())
        self.store = TreeStore(self.directory / "nodes", size_limit=size_limit, fingerprint=self.fingerprint, signature=self.signature)
        self._lock = threading.RLock()
        self._docs: dict[str, _Doc] = {}
        self._forest: tuple[list[tuple[_Doc, int]], torch.Tensor] | None = None
        self._bm25: BM25 | None = None
        self.counters = {"chunks_encoded": 0, "chunks_cached": 0}
        self.max_batch_queries = max_batch_queries
        self._batcher = (
            MicroBatcher(self._answer_batch, max_batch=max_batch_queries, max_wait_s=batch_wait_s, name="sharedctx-index-queries")
            if max_batch_queries > 1
            else None
        )
        self.refresh()

    def _manifest(self) -> dict[str, Any]:
        base = getattr(self.llm.base.config, "_name_or_path", "") or ""
        return {"format": _FORMAT, "fingerprint": self.fingerprint, "signature": self.signature, "base": str(base)}

    @classmethod
    def load(cls, directory: str | os.PathLike, llm: SharedLLM, **options: Any) -> ContextIndex:
        """Open an index built before; refuses one built by another base model or lower-side configuration."""
        directory = Path(directory)
        if not (directory / "docs").is_dir() or DocumentTable(directory).manifest() is None:
            raise StoreError(f"{directory} holds no sharedctx index; build one with ContextIndex(llm, store={str(directory)!r})")
        return cls(llm, directory, **options)

    def persist(self, directory: str | os.PathLike | None = None) -> Path:
        """Everything is written as it is added; with another ``directory``, copy the index there. Returns its path."""
        if directory is None or Path(directory).resolve() == self.directory.resolve():
            return self.directory
        target = ContextIndex(self.llm, directory, size_limit=self.store.size_limit)
        with self._lock:
            docs = list(self._docs.values())
        for doc in docs:
            for key, c in zip(doc.chunk_keys, range(doc.n_chunks)):
                if key not in target.store:
                    if self.encode == "lazy" and key not in self.store:
                        continue  # never needed yet: the copy encodes it when a query does
                    nodes = self._chunk_nodes(doc, c, {"chunks_encoded": 0, "chunks_cached": 0})
                    target.store.put_chunk(key, nodes, n_tokens=doc.chunk_ids(c).numel())
            target.table.put(doc)
        target.close()
        return Path(directory)

    def refresh(self) -> None:
        """Re-read the document table (documents added or removed by other processes)."""
        ids = set(self.table.ids())
        with self._lock:
            for doc_id in list(self._docs):
                if doc_id not in ids:
                    del self._docs[doc_id]
            for doc_id in ids:
                doc = self.table.get(doc_id)
                if doc is None:
                    logger.warning("index %s: the record of document %r is unreadable; skipping it", self.directory, doc_id)
                    continue
                old = self._docs.get(doc_id)
                if old is None or old.chunk_keys != doc.chunk_keys or old.seq != doc.seq:
                    self._docs[doc_id] = doc
            self._forest = None
            self._bm25 = None

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self.store.close()
        self.table.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> ContextIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ documents
    def documents(self) -> list[DocumentInfo]:
        with self._lock:
            docs = sorted(self._docs.values(), key=lambda d: (d.seq, d.doc_id))
        return [d.info() for d in docs]

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._docs

    def delete(self, doc_id: str) -> None:
        """Remove a document (its chunks stay in the store for other documents until evicted or `prune`d)."""
        with self._lock:
            if doc_id not in self._docs and self.table.get(doc_id) is None:
                raise DocumentNotFoundError(f"no document {doc_id!r} in the index {self.directory}; see documents()")
            self.table.delete(doc_id)
            self._docs.pop(doc_id, None)
            self._forest = None
            self._bm25 = None

    def prune(self) -> int:
        """Delete stored chunks no document refers to; returns how many."""
        with self._lock:
            live = {k for d in self._docs.values() for k in d.chunk_keys}
        dead = [k for k in self.store.chunk_keys() if k not in live]
        for k in dead:
            self.store.delete(k)
        return len(dead)

    def add(
        self,
        text_or_path: str | os.PathLike,
        doc_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AddResult:
        """Add (or replace) one document: a `Path`, a string naming an existing file, or the text itself.

        Chunks already in the store are reused, never encoded again; re-adding an unchanged document writes nothing.
        """
        text, source = self._resolve(text_or_path)
        if doc_id is None:
            doc_id = source if source is not None else "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return self._add_text(str(doc_id), text, dict(metadata or {}), source)

    def add_many(
        self,
        items: Iterable[str | os.PathLike],
        *,
        metadata: Mapping[str, Any] | None = None,
        show_progress: bool = True,
    ) -> BuildReport:
        """Add files, directories (recursively; hidden entries skipped) and texts. Unreadable files (binary,
        not UTF-8, empty) are skipped, logged and listed in the report's ``skipped``."""
        from tqdm.auto import tqdm

        report = BuildReport()
        work: list[str | Path] = []
        for item in items:
            if isinstance(item, Path) or (isinstance(item, str) and _looks_like_path(item)):
                work.extend(_iter_files(Path(item)))
            else:
                work.append(item)
        with tqdm(total=len(work), unit="doc", desc="indexing", disable=not show_progress) as bar:
            for item in work:
                try:
                    report.added.append(self.add(item, metadata=metadata))
                except InputError as exc:
                    logger.warning("skipping %s: %s", item, exc)
                    report.skipped.append((str(item), str(exc)))
                bar.update(1)
                bar.set_postfix(encoded=report.chunks_encoded, reused=report.chunks_reused)
        return report

    def _resolve(self, item: str | os.PathLike) -> tuple[str, str | None]:
        if isinstance(item, Path) or (isinstance(item, str) and _looks_like_path(item)):
            return read_document(item), os.path.abspath(item)
        if not isinstance(item, str):
            raise InputError(f"add() takes text or a path, got {type(item).__name__}")
        if not item.strip():
            raise InputError("the document is empty (no text to index)")
        return item, None

    def _add_text(self, doc_id: str, text: str, metadata: dict[str, Any], source: str | None) -> AddResult:
        cfg = self.llm.config
        with self._lock:
            old = self._docs.get(doc_id)
            known = {k: d.root_keys[i] for d in self._docs.values() for i, k in enumerate(d.chunk_keys)}
        ids_parts, off_parts, keys, roots = [], [], [], []
        pending: dict[str, list[int]] = {}
        pending_ids: dict[str, torch.Tensor] = {}
        encoded = reused = deferred = 0
        unknown_root = torch.full((self.llm.base.config.hidden_size,), float("nan"))  # lazy chunks have no key yet

        def flush() -> None:
            nonlocal encoded
            if not pending:
                return
            order = list(pending)
            nodes = self._encode_chunks([pending_ids[k] for k in order])
            for k, chunk_nodes in zip(order, nodes):
                self.store.put_chunk(k, chunk_nodes, n_tokens=pending_ids[k].numel())
                for i in pending[k]:
                    roots[i] = chunk_nodes[(0, 0)].key
            encoded += len(order)
            pending.clear()
            pending_ids.clear()

        for chunk in chunk_text(text, self.llm.tokenizer, cfg.chunk_size, min_fill=self.min_fill):
            self._check_ids(chunk.ids)
            key = self.store.key(chunk.ids)
            ids_parts.append(chunk.ids)
            off_parts.append(chunk.offsets)
            keys.append(key)
            roots.append(None)
            i = len(keys) - 1
            if key in pending:  # repeated within this batch: encoded once
                pending[key].append(i)
                reused += 1
                continue
            if key in known and key in self.store:
                roots[i] = known[key]
                reused += 1
                continue
            nodes = self.store.get_chunk(key)
            if nodes is not None and (0, 0) in nodes and nodes[(0, 0)].key is not None:
                roots[i] = nodes[(0, 0)].key
                reused += 1
                continue
            if self.encode == "lazy":
                roots[i] = unknown_root
                deferred += 1
                continue
            pending[key] = [i]
            pending_ids[key] = chunk.ids
            if len(pending) >= self.batch_chunks:
                flush()
        flush()
        if not keys:
            raise InputError(f"document {doc_id!r} has no tokens to index")
        ids = torch.cat(ids_parts)
        lengths = torch.tensor([0] + [p.numel() for p in ids_parts])
        result = AddResult(doc_id, int(ids.numel()), len(keys), encoded, reused, chunks_deferred=deferred)
        if old is not None and old.chunk_keys == keys and old.text == text and old.metadata == metadata:
            result.unchanged = True
            return result
        doc = _Doc(
            doc_id=doc_id,
            seq=old.seq if old is not None else time.time_ns(),
            text=text,
            ids=ids,
            offsets=torch.cat(off_parts),
            bounds=torch.cumsum(lengths, 0),
            root_keys=torch.stack([r.float() for r in roots]),
            chunk_keys=keys,
            metadata=metadata,
            source=source,
        )
        self.table.put(doc)  # written last: a failed build leaves no record behind
        with self._lock:
            result.replaced = old is not None
            self._docs[doc_id] = doc
            self._forest = None
            self._bm25 = None
        return result

    def _check_ids(self, ids: torch.Tensor) -> None:
        vocab = self.llm.base.config.vocab_size
        if ids.numel() and int(ids.max()) >= vocab:
            raise InputError(f"the tokenizer produced id {int(ids.max())} outside the model's vocabulary of {vocab}")

    # ------------------------------------------------------------------ encoding
    def _encode_chunks(self, chunks: Sequence[torch.Tensor]) -> list[dict[tuple[int, int], NodeStates]]:
        """Every node of each chunk's tree (levels 1..h, full states) and each root's key, in batched passes."""
        height = self.llm.config.tree_height
        buf = torch.cat(list(chunks))
        full_spans: list[tuple[int, int]] = []
        owners: list[tuple[int, tuple[int, int]]] = []
        root_spans: list[tuple[int, int]] = []
        base = 0
        for j, ids in enumerate(chunks):
            n = int(ids.numel())
            if n < 2:
                full_spans.append((base, base + n))
                owners.append((j, (0, 0)))
            frontier = [((0, 0), (0, n))]
            for level in range(1, height + 1):
                nxt = []
                for (_, idx), (a, b) in frontier:
                    if b - a < 2:
                        continue
                    left, right = canonical_children(a, b)
                    nxt += [((level, 2 * idx), left), ((level, 2 * idx + 1), right)]
                for node, (a, b) in nxt:
                    full_spans.append((base + a, base + b))
                    owners.append((j, node))
                frontier = nxt
            root_spans.append((base, base + n))
            base += n
        out: list[dict[tuple[int, int], NodeStates]] = [{} for _ in chunks]
        states = self._encode_padded(buf, full_spans, full=True)
        roots = self._encode_padded(buf, root_spans, full=False)
        for (j, node), st in zip(owners, states):
            out[j][node] = st
        for j, st in enumerate(roots):
            if (0, 0) in out[j]:
                out[j][(0, 0)].key = st.key
            else:
                out[j][(0, 0)] = st
        return out

    def _encode_padded(self, buf: torch.Tensor, spans: list[tuple[int, int]], *, full: bool) -> list[NodeStates]:
        """Encode spans of ``buf`` on their own, right-padding spans of similar length into one batch.

        Exact: under causal attention a token never sees the padding after it, every sampled state lies inside
        its span (indices ``< l``) and the node key is read at the span's own last token. Content-defined chunks
        have many distinct lengths, so batching only equal lengths would run almost one pass per node.
        """
        cfg = self.llm.config
        encoder = self.llm.encoder
        n_layers = cfg.injection_layers if full else 1
        order = sorted(range(len(spans)), key=lambda j: spans[j][0] - spans[j][1])  # longest first
        batches: list[list[int]] = []
        for j in order:
            length = spans[j][1] - spans[j][0]
            if batches:
                top = spans[batches[-1][0]][1] - spans[batches[-1][0]][0]
                if length >= 0.8 * top and (len(batches[-1]) + 1) * top <= cfg.max_batch_tokens:
                    batches[-1].append(j)
                    continue
            batches.append([j])
        out: list[NodeStates | None] = [None] * len(spans)
        with torch.no_grad():
            for members in batches:
                lengths = [spans[j][1] - spans[j][0] for j in members]
                rows = torch.zeros(len(members), lengths[0], dtype=torch.long)
                for r, j in enumerate(members):
                    rows[r, : lengths[r]] = buf[spans[j][0] : spans[j][1]]
                keys, values, first = encoder.run(rows, n_layers)
                last = first[torch.arange(len(members)), torch.tensor(lengths) - 1]  # (B, hidden)
                node_keys = self.llm.base.model.norm(last).float().cpu()
                for r, j in enumerate(members):
                    if not full:
                        out[j] = NodeStates(None, None, node_keys[r])
                        continue
                    idx = torch.tensor(sample_indices(lengths[r], cfg.node_keep, cfg.sampling), device=keys[0].device)
                    k = torch.stack([t[r].index_select(1, idx) for t in keys]).cpu()  # (M, Hkv, n, D)
                    v = torch.stack([t[r].index_select(1, idx) for t in values]).cpu()
                    out[j] = NodeStates(k, v, node_keys[r])
        return out  # type: ignore[return-value]

    def _chunk_nodes(self, doc: _Doc, c: int, counts: dict[str, int]) -> dict[tuple[int, int], NodeStates]:
        """A chunk's nodes from the store, or encoded again (and stored) when missing, evicted or corrupt."""
        key = doc.chunk_keys[c]
        nodes = self.store.get_chunk(key)
        if nodes is not None:
            counts["chunks_cached"] += 1
            return nodes
        ids = doc.chunk_ids(c)
        if self.store.key(ids) != key:
            raise StoreError(f"document {doc.doc_id!r} is inconsistent (chunk {c} does not match its address); add it again")
        nodes = self._encode_chunks([ids])[0]
        try:
            self.store.put_chunk(key, nodes, n_tokens=ids.numel())
        except StoreError as exc:  # answering still works; the next query encodes it again
            logger.warning("could not store chunk %d of %r: %s", c, doc.doc_id, exc)
        counts["chunks_encoded"] += 1
        return nodes

    # ------------------------------------------------------------------ retrieval
    def _forest_view(self) -> tuple[list[tuple[_Doc, int]], torch.Tensor]:
        with self._lock:
            if self._forest is None:
                docs = sorted(self._docs.values(), key=lambda d: (d.seq, d.doc_id))
                entries = [(d, c) for d in docs for c in range(d.n_chunks)]
                hidden = self.llm.base.config.hidden_size
                keys = torch.cat([d.root_keys for d in docs]) if docs else torch.zeros(0, hidden)
                self._forest = (entries, keys)
            return self._forest

    def _chunk_budget(self, n: int) -> int:
        """Upper bound on the states a walk of a chunk of ``n`` tokens injects."""
        cfg = self.llm.config
        keep, h = cfg.node_keep, cfg.tree_height
        if self.expand_margin is not None:
            return (2**h) * min(keep, -(-n // 2**h))
        total, length = 0, n
        for level in range(1, h + 1):
            if length < 2:
                return total + min(keep, length)
            big = -(-length // 2)
            total += min(keep, big) if level < h else min(keep, big) + min(keep, length - big)
            length = big
        return total

    def _lexicon(self, entries: list[tuple[_Doc, int]]) -> BM25:
        """BM25 statistics over the text of every chunk of the forest (rebuilt when documents change)."""
        with self._lock:
            if self._bm25 is None:
                self._bm25 = BM25([_span_text(d, int(d.bounds[c]), int(d.bounds[c + 1])) for d, c in entries])
            return self._bm25

    def _select(self, prompt_ids: torch.Tensor, question: str, top_k: int | None, max_states: int | None):
        """Rank chunks, load the kept ones, walk their trees. Returns (selected, score_fn, counts), where
        ``score_fn(items)`` scores ``(doc, chunk, span)`` items for the question under the policy."""
        entries, root_keys = self._forest_view()
        counts = {"chunks_encoded": 0, "chunks_cached": 0}
        if not entries:
            raise InputError(f"the index {self.directory} holds no documents; add some first")
        cfg = self.llm.config
        lexicon = self._lexicon(entries) if self.policy == "lexical" else None
        if lexicon is not None:
            chunk_scores = lexicon.scores(question)

            def score_fn(items):
                return lexicon.scores(question, [_span_text(d, int(d.bounds[c]) + a, int(d.bounds[c]) + b) for d, c, (a, b), _ in items])
        else:
            if bool(torch.isnan(root_keys).any()):
                raise InputError(
                    f"documents of the index {self.directory} were added with encode='lazy' and have no keys for the "
                    f"{self.policy!r} policy: query it with policy='lexical', or add them again to an eager index"
                )
            qkey = self.llm.query_keys(prompt_ids.reshape(1, -1).to(self.llm.device), [prompt_ids.numel()])[0].cpu()
            chunk_scores = cosine_scores(qkey, root_keys)

            def score_fn(items):
                return cosine_scores(qkey, torch.stack([state().key for _, _, _, state in items]))

        budgets = [self._chunk_budget(int(d.bounds[c + 1] - d.bounds[c])) for d, c in entries]
        kept = rank_chunks(scores=chunk_scores, top_k=top_k or self.top_k, states_per_chunk=budgets, max_states=max_states)
        kept.sort()  # document order: chunk positions follow it
        spans = {rank: (0, int(entries[g][0].chunk_ids(entries[g][1]).numel())) for rank, g in enumerate(kept)}
        loaded: dict[int, dict[tuple[int, int], NodeStates]] = {}

        def state_of(r: int, node: tuple[int, int]):
            """A zero-argument loader of a kept node's states: the store is read (or the chunk encoded) on the
            first call only, so retrieval under the lexical policy never touches states it does not inject."""

            def load() -> NodeStates:
                if r not in loaded:
                    loaded[r] = self._chunk_nodes(*entries[kept[r]], counts)
                return loaded[r][node]

            return load

        def node_scores(node_ids, node_spans):
            return score_fn([(*entries[kept[r]], sp, state_of(r, (lv, ix))) for (r, lv, ix), sp in zip(node_ids, node_spans)])

        if self.expand_margin is None:
            chooser = make_chooser(self.policy, scores_fn=node_scores, generator=torch.Generator().manual_seed(cfg.seed))
            walked = walk_trees(spans, cfg.tree_height, chooser).nodes()
        else:
            walked = [item for r in sorted(spans) for item in _walk_margin(r, spans[r], node_scores, cfg.tree_height, self.expand_margin)]
        selected = []
        for (r, lv, ix), span in walked:
            doc, c = entries[kept[r]]
            selected.append((r, doc, c, (lv, ix), span, state_of(r, (lv, ix)), float(chunk_scores[kept[r]])))
        return selected, score_fn, counts

    def _citations(self, selected, score_fn) -> list[Citation]:
        if not selected:
            return []
        scores = score_fn([(doc, c, span, st) for _, doc, c, _, span, st, _ in selected]).tolist()
        out = []
        keep, sampling = self.llm.config.node_keep, self.llm.config.sampling
        for (r, doc, c, (lv, ix), (s, e), _, chunk_score), score in zip(selected, scores):
            t0 = int(doc.bounds[c]) + s
            t1 = int(doc.bounds[c]) + e
            a, b = _char_span(doc, t0, t1)
            n_states = len(sample_indices(e - s, keep, sampling))  # what injecting the node reads (no state loaded)
            out.append(Citation(doc.doc_id, c, lv, ix, a, b, t0, t1, float(score), chunk_score, n_states, doc.text[a:b], dict(doc.metadata)))
        return out

    def _prompt_ids(self, question: str) -> torch.Tensor:
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        return self.llm._prompt_ids(question, True, None)[0].cpu()

    def retrieve(self, question: str, *, top_k_chunks: int | None = None, max_injected_states: int | None = None) -> list[Citation]:
        """The nodes a query selects, as citations with text, best score first (usable with any text LLM)."""
        selected, score_fn, counts = self._select(self._prompt_ids(question), question, top_k_chunks, max_injected_states or self.max_injected_states)
        self._count(counts)
        cites = self._citations(selected, score_fn)
        return sorted(cites, key=lambda x: (-x.score, x.doc_id, x.token_start))

    def _count(self, counts: dict[str, int]) -> None:
        with self._lock:
            for k, v in counts.items():
                self.counters[k] += v

    # ------------------------------------------------------------------ answering
    def _prepare(
        self, question: str, mode: str, top_k_chunks: int | None, max_injected_states: int | None, max_new_tokens: int, prompt: Any
    ) -> dict[str, Any]:
        """Retrieval for one question: selected nodes, citations, injected states and the prompt to read."""
        if prompt is not None and mode != "latent":
            raise ValueError(f"prompt= replaces what the model reads only in latent mode; {mode} mode builds its own prompt")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        t0 = time.perf_counter()
        qids = self._prompt_ids(question)
        selected, score_fn, counts = self._select(qids, question, top_k_chunks, max_injected_states or self.max_injected_states)
        self._count(counts)
        citations = self._citations(selected, score_fn)
        injection = None
        if mode in ("latent", "hybrid") and selected:
            rows = [[((r, lv, ix), span, state()) for r, _, _, (lv, ix), span, state, _ in selected]]
            injection = self.llm.assemble_injection(rows)
        prompt = qids if prompt is None else prompt
        dropped = 0
        if mode in ("text", "hybrid"):
            prompt, dropped = self._text_prompt(question, citations, max_new_tokens)
        return {
            "mode": mode, "prompt": prompt, "injection": injection, "citations": citations, "counts": counts,
            "dropped": dropped, "t0": t0, "t_ret": time.perf_counter(),
        }

    @staticmethod
    def _stats(prep: dict[str, Any], inner: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        citations, injection = prep["citations"], prep["injection"]
        return {
            "mode": prep["mode"],
            "documents": len({c.doc_id for c in citations}),
            "chunks_selected": len({(c.doc_id, c.chunk) for c in citations}),
            "chunks_encoded": prep["counts"]["chunks_encoded"],
            "chunks_cached": prep["counts"]["chunks_cached"],
            "injected_states": 0 if injection is None else injection.n_states,
            "text_passages_dropped": prep["dropped"],
            "prompt_tokens": inner.get("prompt_tokens", 0),
            "generated_tokens": inner.get("generated_tokens", 0),
            "batch_size": inner.get("batch_size", 1),
            "token_ids": inner.get("token_ids", []),
            "citations": sorted(citations, key=lambda x: (-x.score, x.doc_id, x.token_start)),
            "timings": timings,
        }

    def stream(
        self,
        question: str,
        *,
        mode: str = "latent",
        top_k_chunks: int | None = None,
        max_injected_states: int | None = None,
        max_new_tokens: int = 256,
        stats: dict[str, Any] | None = None,
        prompt: str | Sequence[int] | None = None,
        **generation: Any,
    ) -> Iterator[str]:
        """Yield the answer as it is decoded; ``stats`` receives citations, statistics and timings at the end.

        ``mode``: ``latent`` injects the selected states; ``text`` puts the selected spans into the prompt as text;
        ``hybrid`` does both. ``top_k_chunks`` overrides the index's ``top_k`` (chunks injected) for this call.
        Other options (``temperature``, ``top_k`` and ``top_p`` of sampling, ``stop``, ``seed``, ...) go to
        `SharedLLM.stream`. ``prompt`` (latent mode only): what the model reads instead of the bare question, e.g.
        the token ids of a whole conversation in the chat template; nodes are still selected for ``question``.
        A streamed answer runs its own forward; concurrent `query` calls share batched ones.
        """
        stats = {} if stats is None else stats
        prep = self._prepare(question, mode, top_k_chunks, max_injected_states, max_new_tokens, prompt)
        inner: dict[str, Any] = {}
        yield from self.llm.stream(prep["prompt"], injection=prep["injection"], max_new_tokens=max_new_tokens, stats=inner, **generation)
        end = time.perf_counter()
        t0, t_ret = prep["t0"], prep["t_ret"]
        timings = dict(inner.pop("timings", {}))
        # the model's clock starts after retrieval: time to first token counts from the question
        timings["first_token_s"] = (t_ret - t0) + timings.get("first_token_s", 0.0)
        timings.update({"retrieve_s": t_ret - t0, "total_s": end - t0})
        stats.update(self._stats(prep, inner, timings))

    def query(self, question: str, *, mode: str = "latent", **options: Any) -> Answer:
        """Answer ``question`` from the indexed documents (see `stream` for ``mode`` and options).

        Safe to call from many threads: retrieval runs in the caller's thread, and calls that arrive together
        are answered in one batched forward (``max_batch_queries``), each with the answer it would get alone.
        """
        if self._batcher is None:
            stats: dict[str, Any] = {}
            text = "".join(self.stream(question, mode=mode, stats=stats, **options))
            citations = stats.pop("citations")
            timings = stats.pop("timings")
            return Answer(text=text, citations=citations, stats=stats, timings=timings)
        known = {"top_k_chunks", "max_injected_states", "prompt", "chat", "system"} | SAMPLING_FIELDS
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown query options {unknown}; known: {sorted(known)}")
        max_new_tokens = options.get("max_new_tokens", 256)
        sampling = {k: options[k] for k in SAMPLING_FIELDS if k in options}
        sampling["max_new_tokens"] = max_new_tokens
        SamplingOptions(**sampling)  # invalid options fail here, in the caller, not in a shared batch
        prep = self._prepare(question, mode, options.get("top_k_chunks"), options.get("max_injected_states"), max_new_tokens, options.get("prompt"))
        ids = self.llm._prompt_ids(prep["prompt"], options.get("chat", True), options.get("system"))
        self.llm._check_length(ids.shape[1] + max_new_tokens)
        done = self._batcher.submit((ids, prep["injection"], sampling))
        end = time.perf_counter()
        t0, t_ret = prep["t0"], prep["t_ret"]
        timings = dict(done.timings)
        # the batch's clock starts when it runs: count from the question, including the wait for the batch
        timings["first_token_s"] = (end - t0) - (done.timings["total_s"] - done.timings["first_token_s"])
        timings.update({"retrieve_s": t_ret - t0, "total_s": end - t0})
        stats = self._stats(prep, {**done.stats, "token_ids": done.token_ids}, timings)
        citations = stats.pop("citations")
        stats.pop("timings")
        return Answer(text=done.text, citations=citations, stats=stats, timings=timings)

    def _answer_batch(self, items: list[tuple[torch.Tensor, Any, dict[str, Any]]]):
        return self.llm.complete_batch([ids for ids, _, _ in items], injections=[inj for _, inj, _ in items], options=[o for _, _, o in items])

    @property
    def batch_stats(self) -> dict[str, int]:
        """Batched answering so far: ``batches``, ``items`` (queries) and the ``largest`` batch."""
        return dict(self._batcher.stats) if self._batcher is not None else {"batches": 0, "items": 0, "largest": 0}

    def _text_prompt(self, question: str, citations: list[Citation], max_new_tokens: int) -> tuple[str, int]:
        """The question with the cited spans as numbered passages: best first, as many as fit the model's window.

        Returns the prompt and how many passages did not fit (reported in ``stats``, never silently dropped)."""
        window = self.llm.max_positions or 1 << 30

        def render(cites: list[Citation]) -> str:
            cites = sorted(cites, key=lambda x: (x.doc_id, x.token_start))
            passages = "\n\n".join(f"[{i + 1}] ({c.doc_id}) {c.text.strip()}" for i, c in enumerate(cites))
            return _TEXT_PROMPT.format(passages=passages, question=question)

        chosen: list[Citation] = []
        for cite in sorted(citations, key=lambda x: -x.score):
            if self.llm._prompt_ids(render(chosen + [cite]), True, None).shape[1] + max_new_tokens <= window:
                chosen.append(cite)
        dropped = len(citations) - len(chosen)
        if dropped:
            logger.info("text mode: %d of %d passages do not fit the model's window and were left out", dropped, len(citations))
        return render(chosen), dropped


def _walk_margin(rank, span, node_scores, height, margin):
    """Walk one chunk tree, expanding both children when their scores (``node_scores(ids, spans)``) are within ``margin``."""
    preserved = []
    frontier = [((rank, 0, 0), span)]
    for level in range(1, height + 1):
        nxt = []
        for (r, lv, ix), (s, e) in frontier:
            if e - s < 2:
                preserved.append(((r, lv, ix), (s, e)))
                continue
            left, right = canonical_children(s, e)
            lid, rid = (r, level, 2 * ix), (r, level, 2 * ix + 1)
            if level == height:
                preserved += [(lid, left), (rid, right)]
                continue
            sl, sr = node_scores([lid, rid], [left, right]).tolist()
            if abs(sr - sl) <= margin:
                nxt += [(lid, left), (rid, right)]
            elif sr >= sl:
                preserved.append((lid, left))
                nxt.append((rid, right))
            else:
                preserved.append((rid, right))
                nxt.append((lid, left))
        frontier = nxt
    return sorted(preserved, key=lambda item: item[1][0])


def _char_span(doc: _Doc, t0: int, t1: int) -> tuple[int, int]:
    """Character span of a document's tokens ``[t0, t1)`` (empty when ``t1 <= t0``)."""
    if t1 <= t0:
        return 0, 0
    return int(doc.offsets[t0, 0]), int(doc.offsets[t1 - 1, 1])


def _span_text(doc: _Doc, t0: int, t1: int) -> str:
    """Text of a document's tokens ``[t0, t1)``."""
    a, b = _char_span(doc, t0, t1)
    return doc.text[a:b]
