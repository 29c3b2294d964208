"""`build_index`: chunk on CPU workers, encode on an actor pool into store shards, merge, write document records.

The stages, each a Ray Data operation:

1. **read and chunk** (``map``, CPU tasks): each file is read (`read_document`), cut by `chunk_text` and every
   chunk addressed by `chunk_key`, the store's own key function. A file that is not text, or cannot be read, comes
   back as a row with the reason (listed in the report; the others go on).
2. **plan** (driver): the chunk keys the target store lacks, each assigned to its first occurrence, so a chunk
   repeated across documents or already stored is never encoded.
3. **encode** (``map_batches`` with `_Encoder`, a pool of ``num_actors`` actors): each actor loads the model once,
   encodes batches of ``batch_chunks`` chunks and writes their nodes to its own `TreeStore` shard under
   ``shard_dir``; it returns each chunk's root key. A failed batch is retried by Ray (``max_retries``); an actor
   that dies is restarted and its shard keeps what it wrote.
4. **merge** (driver): `merge_stores` copies the shards' checked entries into the target; the document records are
   written last, only for documents whose every chunk is in the store (the others are listed as failed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..config import SharedCtxConfig
from ..errors import InputError, StoreMismatchError, UnreadableFileError
from ..index.chunking import chunk_text
from ..index.documents import _Doc, _iter_files, read_document
from ..index.facade import ContextIndex
from ..index.results import AddResult, BuildReport
from ..index.merging import merge_stores
from ..index.store import TreeStore, chunk_key

__all__ = ["ModelSpec", "build_index"]

logger = logging.getLogger(__name__)

_NO_EVICTION = 2**62  # a shard must never evict what it was given to hand over


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError("sharedctx.distributed needs Ray Data: pip install 'sharedctx[ray]'") from exc
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """What every actor loads (picklable): `SharedLLM.from_pretrained` of these arguments."""

    model: str | None = None
    adapter: str | None = None
    config: SharedCtxConfig | None = None
    device: str | None = None
    dtype: str | None = None

    def __call__(self):
        from ..model import SharedLLM

        return SharedLLM.from_pretrained(self.model, adapter=self.adapter, config=self.config, device=self.device, dtype=self.dtype)


# ---------------------------------------------------------------------- stage 1: read and chunk (CPU tasks)
class _Chunker:
    """Row ``{doc_id, source, path, text}`` -> the document's token ids, offsets, chunk bounds and chunk keys."""

    def __init__(self, tokenizer: Any, chunk_size: int, min_fill: float, fingerprint: str, signature: dict, vocab: int) -> None:
        self.tokenizer, self.chunk_size, self.min_fill = tokenizer, chunk_size, min_fill
        self.fingerprint, self.signature, self.vocab = fingerprint, signature, vocab

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"doc_id": row["doc_id"], "source": row.get("source") or "", "text": "", "ids": b"", "offsets": b"",
               "bounds": b"", "keys": "[]", "error": "", "failed": False}
        try:
            text = row.get("text") or read_document(row["path"])
            ids, offs, lengths, keys = [], [], [0], []
            for chunk in chunk_text(text, self.tokenizer, self.chunk_size, min_fill=self.min_fill):
                if chunk.ids.numel() and int(chunk.ids.max()) >= self.vocab:
                    raise InputError(f"the tokenizer produced id {int(chunk.ids.max())} outside the model's vocabulary of {self.vocab}")
                ids.append(chunk.ids)
                offs.append(chunk.offsets)
                lengths.append(chunk.ids.numel())
                keys.append(chunk_key(self.fingerprint, self.signature, chunk.ids))
            if not keys:
                raise InputError(f"document {row['doc_id']!r} has no tokens to index")
        except UnreadableFileError as exc:
            out.update(error=str(exc), failed=True)
            return out
        except InputError as exc:  # not text: skipped, as add_many does
            out["error"] = str(exc)
            return out
        except Exception as exc:  # anything else fails this document only
            out.update(error=f"{type(exc).__name__}: {exc}", failed=True)
            return out
        out.update(
            text=text,
            ids=torch.cat(ids).numpy().astype("<i8").tobytes(),
            offsets=torch.cat(offs).numpy().astype("<i8").tobytes(),
            bounds=np.cumsum(lengths).astype("<i8").tobytes(),
            keys=json.dumps(keys),
        )
        return out


def _emit_chunks(row: dict[str, Any], *, needed: dict[str, str]) -> list[dict[str, Any]]:
    """The chunks of one document this build encodes (those assigned to it by the plan)."""
    if not row["ids"]:
        return []
    ids = np.frombuffer(row["ids"], dtype="<i8")
    bounds = np.frombuffer(row["bounds"], dtype="<i8")
    out, seen = [], set()
    for c, key in enumerate(json.loads(row["keys"])):
        if needed.get(key) == row["doc_id"] and key not in seen:
            seen.add(key)
            out.append({"key": key, "ids": ids[bounds[c] : bounds[c + 1]].tobytes()})
    return out


# ---------------------------------------------------------------------- stage 3: encode (actor pool)
class _Encoder:
    """An actor: loads the model once, encodes batches of chunks into its own store shard."""

    def __init__(self, load: Callable[[], Any], fingerprint: str, signature: dict, shard_dir: str) -> None:
        self.llm = load()
        if self.llm.fingerprint != fingerprint or self.llm.config.lower_signature() != signature:
            raise StoreMismatchError(
                f"an encoding actor loaded base model {self.llm.fingerprint} with {self.llm.config.lower_signature()}, "
                f"not the index's {fingerprint} with {signature}; give every worker the same model and options"
            )
        self.shard = TreeStore(Path(shard_dir) / f"actor-{uuid.uuid4().hex[:12]}", size_limit=_NO_EVICTION,
                               fingerprint=fingerprint, signature=signature)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        ids = [torch.from_numpy(np.frombuffer(b, dtype="<i8").copy()) for b in batch["ids"]]
        with torch.inference_mode():
            nodes = self.llm.encoder.encode_chunks(ids)
        roots = []
        for key, chunk, t in zip(keys, nodes, ids):
            self.shard.put_chunk(key, chunk, n_tokens=t.numel())
            roots.append(chunk[(0, 0)].key.detach().float().cpu().numpy())
        return {"key": np.array(keys, dtype=object), "root": np.stack(roots)}


# ---------------------------------------------------------------------- the build
def _source_dataset(ray, source: Any, report: BuildReport, follow_links: bool):
    if isinstance(source, ray.data.Dataset):
        def with_ids(row: dict[str, Any]) -> dict[str, Any]:
            import hashlib

            text = row["text"]
            doc_id = row.get("doc_id") or "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            return {"doc_id": str(doc_id), "source": row.get("source") or "", "path": "", "text": text}

        return source.map(with_ids)
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    rows = []
    for item in source:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError(f"build_index takes paths or a ray.data.Dataset of texts, got {type(item).__name__}")
        for path, reason in _iter_files(Path(item), follow_links=follow_links):
            if reason is not None:
                report.skipped.append((str(path), reason))
                continue
            source_path = os.path.abspath(path)
            rows.append({"doc_id": source_path, "source": source_path, "path": str(path), "text": ""})
    return ray.data.from_items(rows) if rows else None


def build_index(
    source: str | os.PathLike | Iterable[str | os.PathLike] | Any,
    store: str | os.PathLike,
    *,
    model: str | Callable[[], Any] | None = None,
    adapter: str | None = None,
    config: SharedCtxConfig | None = None,
    dtype: str | None = None,
    num_actors: int = 2,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    batch_chunks: int = 16,
    min_fill: float = 0.75,
    shard_dir: str | os.PathLike | None = None,
    keep_shards: bool = False,
    max_retries: int = 3,
    follow_links: bool = False,
) -> BuildReport:
    """Add ``source`` to the index in ``store`` with Ray (call ``ray.init`` first to choose the cluster).

    Args:
        source: files and directories (read by Ray workers, as `ContextIndex.add_many` reads them), or a
            ``ray.data.Dataset`` with a ``text`` column and optional ``doc_id`` and ``source`` columns.
        store: the index directory (new, empty, or an index built by the same model and options).
        model: a base model id or folder (with ``adapter``, ``config``, ``dtype``), or a picklable callable that
            returns a `SharedLLM` (e.g. ``functools.partial(sharedctx.testing.make_llm, "llama")``). Loaded once by
            the driver (for the tokenizer and fingerprint) and once by each actor.
        num_actors, num_gpus_per_actor, num_cpus_per_actor: the encoding pool; with GPUs, actors load on ``cuda``.
        batch_chunks: chunks per encoded batch.
        shard_dir: where actors write their shards (default ``store/shards``); must be a filesystem every node
            and the driver see. This run's shards are removed after merging unless ``keep_shards``.
        max_retries: restarts of a dead actor and retries of a failed batch before its chunks count as failed.

    Returns a `BuildReport`: documents added, files skipped (not text) and failed (unreadable, or a chunk that
    failed to encode after the retries); a failed document gets no record and the others are kept.
    """
    ray = _ray()
    if num_actors < 1 or batch_chunks < 1:
        raise ValueError(f"num_actors and batch_chunks must be >= 1, got {num_actors} and {batch_chunks}")
    if not ray.is_initialized():
        ray.init()
    load = model if callable(model) else ModelSpec(
        model, adapter, config, device="cuda" if num_gpus_per_actor > 0 else None, dtype=dtype)
    llm = load() if callable(model) else ModelSpec(model, adapter, config, device="cpu", dtype=dtype)()
    index = ContextIndex(llm, store, batch_chunks=batch_chunks, min_fill=min_fill, max_batch_queries=1)
    report = BuildReport()
    run_dir = Path(shard_dir or Path(index.directory) / "shards") / f"run-{uuid.uuid4().hex[:12]}"
    try:
        ds = _source_dataset(ray, source, report, follow_links)
        if ds is None:
            return report
        chunker = _Chunker(llm.tokenizer, llm.config.chunk_size, min_fill, index.fingerprint, index.signature,
                           llm.base.config.vocab_size)
        docs = ds.map(chunker).materialize()

        # plan: every chunk the target lacks, assigned to the first document that has it
        needed: dict[str, str] = {}
        for row in docs.select_columns(["doc_id", "keys"]).iter_rows():
            for key in json.loads(row["keys"]):
                if key not in needed and key not in index.store:
                    needed[key] = row["doc_id"]
        roots: dict[str, np.ndarray] = {}
        if needed:
            run_dir.mkdir(parents=True, exist_ok=True)
            chunks = docs.flat_map(_emit_chunks, fn_kwargs={"needed": needed}).materialize()
            _encode(chunks, roots, load, index, run_dir, batch_chunks, num_actors, num_gpus_per_actor,
                    num_cpus_per_actor, max_retries)
            shards = sorted(p for p in run_dir.iterdir() if p.is_dir())
            merge_stores(index.store, shards)
        _write_records(index, docs, needed, roots, report)
        index.refresh()
        logger.info("built %s: %d documents, %d chunks encoded, %d reused, %d skipped, %d failed", index.directory,
                    report.documents, report.chunks_encoded, report.chunks_reused, len(report.skipped), len(report.failed))
    finally:
        index.close()
        if not keep_shards and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            parent = run_dir.parent
            if shard_dir is None and parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
    return report


def _encode(chunks: Any, roots: dict[str, np.ndarray], load: Callable[[], Any], index: ContextIndex, run_dir: Path,
            batch_chunks: int, num_actors: int, num_gpus: float, num_cpus: float, max_retries: int) -> None:
    """Stage 3: encode ``chunks`` on the actor pool into shards under ``run_dir``; collect each chunk's root key."""
    import ray

    with warnings.catch_warnings():  # actor restarts and retries have no named parameter yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        encoded = chunks.map_batches(
            _Encoder,
            fn_constructor_kwargs={"load": load, "fingerprint": index.fingerprint, "signature": index.signature,
                                   "shard_dir": str(run_dir)},
            batch_size=batch_chunks,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus or None,
            num_cpus=num_cpus,
            max_restarts=max_retries,
            max_task_retries=max_retries,
        )
    ctx = encoded.context  # this dataset's own settings (copied when it was made)
    ctx.actor_task_retry_on_errors = True  # a batch that raised is retried, up to max_retries
    ctx.max_errored_blocks = -1  # a batch failing after its retries fails its documents, not the build
    for batch in encoded.iter_batches(batch_format="numpy", batch_size=None):
        for key, root in zip(batch["key"], batch["root"]):
            roots[str(key)] = root


def _write_records(index: ContextIndex, docs: Any, needed: dict[str, str], roots: dict[str, np.ndarray], report: BuildReport) -> None:
    """Write the record of every document whose chunks are all in the store; list the others as failed."""
    known = index.live.known_roots()
    for row in docs.iter_rows():
        doc_id, where = row["doc_id"], row["source"] or row["doc_id"]
        if row["error"]:
            (report.failed if row["failed"] else report.skipped).append((where, row["error"]))
            continue
        keys = json.loads(row["keys"])
        root_keys, missing = [], []
        for key in keys:
            if key in roots:
                root_keys.append(torch.from_numpy(np.array(roots[key], dtype=np.float32)))
            elif key in known and key in index.store:
                root_keys.append(known[key].float())
            else:
                stored = index.store.get_chunk(key)
                if stored is None or (0, 0) not in stored or stored[(0, 0)].key is None:
                    missing.append(key)
                    continue
                root_keys.append(stored[(0, 0)].key.float())
        if missing:
            report.failed.append((where, f"{len(missing)} of its chunks failed to encode after Ray's retries"))
            continue
        encoded = sum(1 for k in set(keys) if needed.get(k) == doc_id)
        ids = torch.from_numpy(np.frombuffer(row["ids"], dtype="<i8").copy())
        old = index.table.get(doc_id)
        result = AddResult(doc_id, int(ids.numel()), len(keys), encoded, len(keys) - encoded)
        text, source = row["text"], row["source"] or None
        if old is not None and old.chunk_keys == keys and old.text == text and old.metadata == {}:
            result.unchanged = True
            report.added.append(result)
            continue
        doc = _Doc(
            doc_id=doc_id,
            seq=old.seq if old is not None else time.time_ns(),
            text=text,
            ids=ids,
            offsets=torch.from_numpy(np.frombuffer(row["offsets"], dtype="<i8").copy()).reshape(-1, 2),
            bounds=torch.from_numpy(np.frombuffer(row["bounds"], dtype="<i8").copy()),
            root_keys=torch.stack(root_keys),
            chunk_keys=keys,
            metadata={},
            source=source,
        )
        index.table.put(doc)
        result.replaced = old is not None
        report.added.append(result)
