"""The documents of a ContextIndex: the on-disk table of documents (usable without a model) and reading files.

Each document record (token ids, character offsets, text, chunk boundaries and chunk root keys) is one checked
safetensors blob in ``DIR/docs``, a diskcache that never evicts and never unpickles (see `sharedctx.index.store`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DocumentNotFoundError, InputError, UnreadableFileError
from .results import DocumentInfo
from .store import BlobCache, StoreMismatchError

__all__ = ["DocumentTable", "DocumentNotFoundError", "read_document"]



# ---------------------------------------------------------------------- documents
@dataclass
class _Doc:
    doc_id: str
    seq: int
    text: str
    ids: torch.Tensor  # (N,) int64
    offsets: torch.Tensor  # (N, 2) int64 character spans
    bounds: torch.Tensor  # (n_chunks + 1,) token boundaries of the chunks
    root_keys: torch.Tensor  # (n_chunks, hidden) float32
    chunk_keys: list[str]
    metadata: dict[str, Any]
    source: str | None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_keys)

    def chunk_ids(self, c: int) -> torch.Tensor:
        return self.ids[int(self.bounds[c]) : int(self.bounds[c + 1])]

    def info(self) -> DocumentInfo:
        return DocumentInfo(self.doc_id, int(self.ids.numel()), self.n_chunks, len(self.text), self.source, dict(self.metadata))


class DocumentTable:
    """The documents of an index on disk (``DIR/docs``): usable without a model (listing, removing)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._blobs = BlobCache(self.directory / "docs", size_limit=None)

    # manifest: which model and options built this index
    def manifest(self) -> dict[str, Any] | None:
        raw = self._blobs.get_raw("manifest")
        return None if raw is None else json.loads(raw)

    def bind(self, manifest: dict[str, Any]) -> None:
        mine = json.dumps(manifest, sort_keys=True).encode()
        held = json.loads(self._blobs.add_raw("manifest", mine))
        keys = ("fingerprint", "signature")
        if {k: held.get(k) for k in keys} != {k: manifest.get(k) for k in keys}:
            raise StoreMismatchError(
                f"the index in {self.directory} was built by base model {held.get('fingerprint')} "
                f"({held.get('base', '?')}) with lower-side options {held.get('signature')}; this model is "
                f"{manifest['fingerprint']} ({manifest.get('base', '?')}) with {manifest['signature']}. Open it with the "
                "model and options it was built with, or build a new index in another directory"
            )

    def remember(self, **options: Any) -> None:
        """Record query-side options (``policy``, ``encode``) in the manifest: the index is opened with them next time."""
        held = self.manifest() or {}
        if any(held.get(k) != v for k, v in options.items()):
            self._blobs.set_raw("manifest", json.dumps({**held, **options}, sort_keys=True).encode())

    def ids(self) -> list[str]:
        return [k[4:] for k in self._blobs.keys("doc/")]

    def get(self, doc_id: str, model: Any = None) -> _Doc | None:
        got = self._blobs.get("doc/" + doc_id)
        if got is None:
            return None
        t, meta = got
        header = json.loads(meta["header"])
        ids = t["ids"].long()
        bounds = t["bounds"].long()
        keys = header["chunk_keys"]
        return _Doc(
            doc_id=header["doc_id"],
            seq=int(header["seq"]),
            text=bytes(t["text"].numpy().tobytes()).decode("utf-8"),
            ids=ids,
            offsets=t["offsets"].long(),
            bounds=bounds,
            root_keys=t["root_keys"].float(),
            chunk_keys=keys,
            metadata=header.get("metadata", {}),
            source=header.get("source"),
        )

    def put(self, doc: _Doc) -> None:
        text = torch.frombuffer(bytearray(doc.text.encode("utf-8")), dtype=torch.uint8)
        tensors = {
            "ids": doc.ids.to(torch.int32),
            "offsets": doc.offsets.to(torch.int64),
            "bounds": doc.bounds.to(torch.int64),
            "root_keys": doc.root_keys.to(torch.float32),
            "text": text,
        }
        header = {
            "doc_id": doc.doc_id,
            "seq": doc.seq,
            "chunk_keys": doc.chunk_keys,
            "metadata": doc.metadata,
            "source": doc.source,
        }
        self._blobs.set("doc/" + doc.doc_id, tensors, {"header": json.dumps(header)})

    def delete(self, doc_id: str) -> bool:
        return self._blobs.delete("doc/" + doc_id)

    def close(self) -> None:
        self._blobs.close()


def read_document(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; binary, non-UTF-8 and empty files raise `InputError` with the reason."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory: use add_many() (or `sharedctx index add DIR`) to add the files in it")
    if not path.is_file():
        raise InputError(f"{path}: no such file" + (" (a broken symbolic link)" if path.is_symlink() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    if b"\x00" in data[:65536]:
        raise InputError(f"{path}: looks like a binary file (it contains NUL bytes); give a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start}); convert it, e.g. `iconv -t utf-8`") from exc
    if not text.strip():
        raise InputError(f"{path}: holds no text")
    return text


def _iter_files(path: Path, *, follow_links: bool = False) -> Iterator[tuple[Path, str | None]]:
    """The files under ``path`` (hidden entries skipped), each with None or the reason it is left out: without
    ``follow_links``, a symbolic link whose target lies outside ``path`` is left out, and linked folders are not
    entered. A file named directly is always taken."""
    if not path.is_dir():
        yield path, None
        return
    root = path.resolve()
    seen: set[Path] = set()
    for here, dirs, files in os.walk(path, followlinks=follow_links):
        real = Path(here).resolve()
        if real in seen:  # a followed link back up the tree would be walked forever
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(here) / name
            if not follow_links and file.is_symlink():
                target = file.resolve()
                if not target.is_relative_to(root):
                    yield file, f"a symbolic link to {target}, outside {path}; pass --follow-links (follow_links=True) to index it"
                    continue
            yield file, None
