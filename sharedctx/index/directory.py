"""The index directory on disk: what may hold an index (never a foreign folder), creating it private, and
pruning node entries no document refers to any more."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import StoreError
from .documents import DocumentTable
from .store import TreeStore

__all__ = ["check_store_directory", "make_store_directory", "prune_store"]


def check_store_directory(directory: str | os.PathLike) -> bool:
    """Check that ``directory`` can hold an index, without creating anything; True when it holds one already.

    sharedctx builds only into a directory it creates, an empty one, or one holding an index it built: a regular
    file, or a non-empty directory without an index (``/tmp``, a home folder, a project), raises `StoreError`
    before any work, so nothing foreign is filled or has its permissions changed.
    """
    path = Path(directory)
    if not path.exists():
        return False
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a directory: give a new directory (or an index's) for --store / store=")
    if (path / "docs").is_dir():
        return True
    try:
        foreign = next(iter(os.scandir(path)), None)
    except OSError as exc:
        raise StoreError(f"cannot read the directory {path}: {exc.strerror or exc}; check its permissions") from exc
    if foreign is not None:
        raise StoreError(
            f"{path} is not empty and holds no sharedctx index (it has {foreign.name!r}); sharedctx builds only into a "
            f"new or empty directory: give one, e.g. {path / 'sharedctx-index'}"
        )
    return False


def make_store_directory(directory: Path) -> None:
    """Create the index directory private (0700); one that exists (checked by `check_store_directory`) is left as it is."""
    if check_store_directory(directory) or directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is narrowed by the umask: make it exact
    except FileExistsError:
        check_store_directory(directory)  # made by another process meanwhile
    except OSError as exc:
        raise StoreError(f"cannot create the index directory {directory}: {exc.strerror or exc}; check the permissions of its parent") from exc


def prune_store(table: DocumentTable, store: TreeStore, *, keep: Iterable[str] = ()) -> int:
    """Delete the chunks of ``store`` that no document of ``table`` (nor ``keep``) refers to; returns how many.

    Safe against concurrent readers and builders of the same directory: the document table is read from disk right
    before deleting, so a chunk of any document recorded by then (in any process) is kept. A reader holding the
    record of a document removed earlier, or a builder that has stored nodes but not yet its record, finds them
    missing and encodes them again (as after an eviction): never a wrong answer. Value files no entry names (left by
    a write killed midway, such as a merge) are deleted too, once old enough (`BlobCache.reclaim_orphans`).
    """
    store.blobs.reclaim_orphans()
    table.reclaim_orphans()
    keep = set(keep)
    candidates = [k for k in store.chunk_keys() if k not in keep]
    if not candidates:
        return 0
    live = set(keep)
    for doc_id in table.ids():  # the table on disk now, not an earlier view of it
        doc = table.get(doc_id)
        if doc is not None:
            live.update(doc.chunk_keys)
    return sum(bool(store.delete(k)) for k in candidates if k not in live)
