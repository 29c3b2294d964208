"""``sharedctx index add|list|remove|prune|merge`` and ``sharedctx ask --store``: the index commands of the CLI.

Commands that only read an index (``index list``, ``ask --store`` without ``--file``) open it read-only when asked
(``--read-only``) or when its directory cannot be written (a read-only mount, another user's index): nothing is
written then, and damaged records are reported instead of quarantined. The model is loaded by the function the main
CLI passes in (``load_model(args)``), which also adds the model options to each parser (``add_model_args``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["UNTRAINED_NOTE", "add_index_parser", "cmd_ask_store", "printable"]

UNTRAINED_NOTE = (
    "note: this model's injection adapter is untrained (it starts as the identity), so the answer does not "
    "read the context yet; pass --adapter DIR with a trained adapter"
)


def printable(text: str) -> str:
    """``text`` as one line of plain output: a document id holding a newline, a tab or another control character is
    printed as a JSON string (quoted and escaped), so each document stays on its own line."""
    return text if text.isprintable() else json.dumps(text, ensure_ascii=False)


def read_only(args) -> bool:
    """Open ``args.store`` read-only: asked for, or its directory (or its databases) cannot be written."""
    if getattr(args, "read_only", False):
        return True
    store = Path(args.store)
    probes = [store, store / "docs", store / "docs" / "cache.db", store / "nodes", store / "nodes" / "cache.db"]
    if any(p.exists() and not os.access(p, os.W_OK) for p in probes):
        print(f"note: {store} is not writable: reading it read-only (nothing is written; damaged records are reported, "
              "not quarantined)", file=sys.stderr)
        return True
    return False


def _check_index(store: str) -> None:
    from .errors import InputError
    from .index.directory import check_store_directory

    if not check_store_directory(store):
        raise InputError(f"{store} holds no index; build one with `sharedctx index add --store {store} PATH...` first")


def _apply_manifest(args, *, read_only: bool = False) -> None:
    """Take the lower-side options an existing index was built with, unless given on the command line."""
    from .index import DocumentTable

    if not (Path(args.store) / "docs").is_dir():
        return
    table = DocumentTable(args.store, read_only=read_only)
    try:
        manifest = table.manifest() or {}
    finally:
        table.close()
    for name, value in (manifest.get("signature") or {}).items():
        if getattr(args, name, "missing") is None:
            setattr(args, name, value)


def _open_index(args, load_model: Callable, *, create: bool):
    from .errors import InputError
    from .index import ContextIndex
    from .index.directory import check_store_directory

    exists = args.store is None or check_store_directory(args.store)  # a file or a foreign directory is refused before loading the model
    if not create and not exists:
        raise InputError(f"{args.store} holds no index; build one with `sharedctx index add --store {args.store} PATH...`")
    options: dict[str, Any] = {}
    if args.store is not None and exists and not create and read_only(args):
        options["read_only"] = True
    elif getattr(args, "read_only", False):
        raise InputError("--read-only answers from an index as it is: it cannot add --file to it; drop one of them")
    if args.store is not None:
        _apply_manifest(args, read_only=bool(options.get("read_only")))
    llm = load_model(args)
    if getattr(args, "top_k", None):
        options["top_k"] = args.top_k
    if getattr(args, "max_injected_states", None):
        options["max_injected_states"] = args.max_injected_states
    if getattr(args, "size_limit", None):
        options["size_limit"] = int(args.size_limit * 2**20)
    # policy and encode mode: as given, else the ones the index was built with (ContextIndex reads its manifest)
    if args.policy is not None:
        options["policy"] = args.policy
    if getattr(args, "lazy", False):
        options["encode"] = "lazy"
        options.setdefault("policy", "lexical")
    if getattr(args, "embedder", None):  # hybrid chunk ranking: BM25 fused with the embedder's ranks
        options["embedder"] = args.embedder
        options.setdefault("policy", "lexical")
    if args.store is None and options.get("policy", llm.config.policy) == "lexical":  # a temporary index for `ask --file`: tokenise only
        options["encode"] = "lazy"
    return llm, ContextIndex(llm, args.store, **options)


def _build_with_ray(args):
    """`index add --ray`: the build of `sharedctx.distributed.build_index` on the cluster at --ray-address."""
    import functools

    from .errors import InputError
    from .index.directory import check_store_directory

    if args.lazy:
        raise InputError("--lazy and --ray do not go together: --ray encodes every chunk on the cluster; drop one")
    check_store_directory(args.store)  # a file or a foreign directory is refused before starting Ray
    _apply_manifest(args)
    try:
        import ray

        from .distributed import build_index
    except ImportError as exc:
        raise InputError("--ray needs Ray Data: pip install 'sharedctx[ray]'") from exc
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        return build_index(args.paths, args.store, model=functools.partial(args.load_model, args), num_actors=args.ray_actors,
                           num_gpus_per_actor=args.ray_gpus_per_actor, follow_links=args.follow_links)
    finally:
        ray.shutdown()


def _cmd_index_add(args) -> int:
    t0 = time.perf_counter()
    if args.ray:
        report = _build_with_ray(args)
        payload = report.to_dict()
        payload["timings"] = {"load_s": 0.0, "build_s": round(time.perf_counter() - t0, 4)}
        payload["store"] = str(args.store)
    else:
        llm, index = _open_index(args, args.load_model, create=True)
        t_load = time.perf_counter()
        report = index.add_many(args.paths, show_progress=sys.stderr.isatty() and not args.json, follow_links=args.follow_links)
        payload = report.to_dict()
        payload["timings"] = {"load_s": round(t_load - t0, 4), "build_s": round(time.perf_counter() - t_load, 4)}
        payload["store"] = str(index.directory)
        index.close()
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(
            f"{report.documents} documents, {report.tokens} tokens, {report.chunks} chunks: "
            f"{report.chunks_encoded} encoded, {report.chunks_reused} reused"
            + (f", {report.chunks_deferred} left to encode on first latent use" if report.chunks_deferred else "")
            + f" ({payload['timings']['build_s']:.2f} s)"
        )
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        for path, reason in report.failed:
            print(f"failed {reason}", file=sys.stderr)
    # files that could not be read are an error (after all the others were added); files that are not text are not
    return 1 if report.failed or (report.skipped and not report.documents) else 0


def _cmd_index_list(args) -> int:
    from .errors import StoreError
    from .index import DocumentTable

    _check_index(args.store)
    table = DocumentTable(args.store, read_only=read_only(args))
    try:
        docs = [table.get(i) for i in table.ids()]
        rows = sorted((d for d in docs if d is not None), key=lambda d: (d.seq, d.doc_id))
        infos = [vars(d.info()) for d in rows]
        damaged = table.quarantined()  # damaged records are set aside, never deleted: say which and how to restore
        try:
            manifest, problem = table.manifest(), None
        except StoreError as exc:  # the documents are still listed; the manifest's damage is reported with its fix
            manifest, problem = None, str(exc)
    finally:
        table.close()
    if problem:
        print(f"damaged: {problem}", file=sys.stderr)
    if args.json:
        quarantined = [{**q.to_dict(), "advice": q.advice(args.store)} for q in damaged]
        payload = {"store": str(args.store), "manifest": manifest, "documents": infos, "quarantined": quarantined}
        if problem:
            payload["manifest_error"] = problem
        print(json.dumps(payload, indent=2))
    else:
        for info in infos:
            print(f"{printable(info['doc_id'])}\t{info['tokens']} tokens\t{info['chunks']} chunks")
        print(f"{len(infos)} documents" + (f", {len(damaged)} damaged (quarantined)" if damaged else ""))
        for q in damaged:
            print(f"damaged: {q.advice(args.store)}", file=sys.stderr)
    return 1 if problem else 0


def _cmd_index_remove(args) -> int:
    from .errors import StoreError
    from .index import DocumentNotFoundError, DocumentTable

    _check_index(args.store)
    table = DocumentTable(args.store)
    try:
        missing = [d for d in args.doc_ids if d not in set(table.ids()) | {q.doc_id for q in table.quarantined()}]
        if missing:
            raise DocumentNotFoundError(f"no documents {missing} in {args.store}; see `sharedctx index list --store {args.store}`")
        for doc_id in args.doc_ids:
            table.delete(doc_id)
        print(f"removed {len(args.doc_ids)} documents")
        try:  # the removal is done: the word counts left behind are a cache, deleted here or by the next prune
            _prune_lexicon(args.store, table)
        except StoreError as exc:
            print(f"warning: the documents are removed, but their word counts were not: {exc}; `sharedctx index prune "
                  f"--store {args.store}` deletes them later", file=sys.stderr)
    finally:
        table.close()
    return 0


def _cmd_index_prune(args) -> int:
    from .index.directory import prune_store

    _check_index(args.store)
    table, store = _open_store_files(args.store)
    try:
        before = store.blobs.volume()
        orphans = store.blobs.reclaim_orphans() + table.reclaim_orphans()  # files of writes cut short (a killed merge)
        removed = prune_store(table, store)
        _prune_lexicon(args.store, table)
        freed = before - store.blobs.volume()
    finally:
        store.close()
        table.close()
    if args.json:
        print(json.dumps({"store": str(args.store), "chunks_removed": removed, "bytes_freed": freed,
                          "orphan_files_removed": orphans}, indent=2))
    else:
        print(f"removed {removed} chunks no document refers to ({freed / 2**20:.1f} MiB)"
              + (f" and {orphans} value files no entry refers to (left by an interrupted write)" if orphans else ""))
    return 0


def _cmd_index_merge(args) -> int:
    from .index.merging import merge_into

    table, store = _open_store_files(args.store)
    try:
        report = merge_into(table, store, args.shards)
    finally:
        store.close()
        table.close()
    if args.json:
        print(json.dumps({"store": str(args.store), **report.to_dict()}, indent=2))
    else:
        print(f"merged {len(report.shards)} shards: {report.chunks_added} chunks added, {report.chunks_present} already "
              f"present, {report.documents_added} documents added, {report.documents_present} already present"
              + (f", {len(report.conflicts)} conflicts decided" if report.conflicts else "")
              + (f", {len(report.refused)} entries left out" if report.refused else ""))
    for shard, doc_id, resolution in report.conflicts:
        print(f"conflict: document {printable(doc_id)} of {shard}: {resolution}", file=sys.stderr)
    for shard, key, reason in report.refused:
        print(f"refused {printable(key)} of {shard}: {reason}", file=sys.stderr)
    return 1 if report.refused else 0


def _prune_lexicon(directory: str, table) -> None:
    """Delete the kept word counts (DIR/lexicon) of documents the table no longer holds."""
    from .index.lexicon import LexiconFiles

    if (Path(directory) / "lexicon").is_dir():
        files = LexiconFiles(Path(directory) / "lexicon")
        try:
            files.prune(table.ids())
        finally:
            files.close()


def _open_store_files(directory: str):
    """The document table and node store of the index in ``directory``, without a model: the store keeps the size
    limit it was opened with last and is bound to the model and options the index's manifest names."""
    from .index import DocumentTable
    from .index.store import TreeStore

    _check_index(directory)
    table = DocumentTable(directory)
    try:
        manifest = table.manifest() or {}
        nodes = Path(directory) / "nodes"
        store = TreeStore(nodes, size_limit=_size_limit(nodes), fingerprint=manifest.get("fingerprint"), signature=manifest.get("signature"))
    except BaseException:
        table.close()
        raise
    return table, store


def _size_limit(nodes: Path) -> int:
    """The size limit a node store was opened with last (kept, not reset, by a command that takes none)."""
    import sqlite3

    from .index.store import DEFAULT_SIZE_LIMIT

    try:
        with sqlite3.connect(f"file:{nodes / 'cache.db'}?mode=ro", uri=True) as db:
            row = db.execute("SELECT value FROM Settings WHERE key = 'size_limit'").fetchone()
    except sqlite3.Error:
        row = None
    return int(row[0]) if row else DEFAULT_SIZE_LIMIT


def cmd_ask_store(args, load_model: Callable) -> int:
    """``sharedctx ask --store DIR`` (and ``ask --file`` in text or hybrid mode, through a temporary index)."""
    t0 = time.perf_counter()
    llm, index = _open_index(args, load_model, create=bool(args.file))
    report = None
    try:
        if args.file:
            report = index.add_many(args.file, show_progress=False, follow_links=args.follow_links)
            for path, reason in report.skipped + report.failed:
                print(f"skipped {path}: {reason}", file=sys.stderr)
            if args.store is None and not report.added:
                from .errors import InputError

                raise InputError("no text to read: " + "; ".join(f"{p}: {r}" for p, r in report.skipped + report.failed))
        t_load = time.perf_counter()
        stream = sys.stdout.isatty() and not args.json
        if not llm.adapter_trained and not args.json and args.mode != "text":
            print(UNTRAINED_NOTE, file=sys.stderr)
        stats: dict = {}
        pieces = []
        for delta in index.stream(args.question, mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  stop_on_repeat=args.stop_on_repeat, stats=stats):
            pieces.append(delta)
            if stream:
                print(delta, end="", flush=True)
    finally:
        index.close()
    failed = bool(report and (report.failed or report.skipped))
    answer = "".join(pieces)
    citations = stats.pop("citations")
    timings = dict(stats.pop("timings"))
    timings["load_s"] = t_load - t0
    timings["total_s"] = time.perf_counter() - t0
    stats.pop("token_ids", None)
    stats["adapter"] = {"path": llm.adapter_path, "trained": llm.adapter_trained}
    if args.json:
        payload = {
            "answer": answer,
            "citations": [c.to_dict() for c in citations],
            "stats": stats,
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        if not llm.adapter_trained and args.mode != "text":
            payload["warning"] = UNTRAINED_NOTE
        print(json.dumps(payload, indent=2))
        return 1 if failed else 0
    print() if stream else print(answer)
    print("\nsources:")
    for i, c in enumerate(citations[: args.show_citations]):
        snippet = " ".join(c.text.split())[:100]
        print(f"  [{i + 1}] {printable(c.doc_id)} chars {c.char_start}-{c.char_end} (score {c.score:.3f}): {snippet}")
    print(
        f"({stats['chunks_selected']} chunks, {stats['injected_states']} injected states, {stats['chunks_cached']} cached, "
        f"{stats['chunks_encoded']} encoded; {timings['total_s']:.2f} s)",
        file=sys.stderr,
    )
    return 1 if failed else 0


def add_index_parser(sub: Any, add_model_args: Callable, load_model: Callable) -> None:
    """Register ``sharedctx index ...``; ``add_model_args(parser)`` adds the model options, ``load_model(args)``
    builds the `SharedLLM` (both from the CLI)."""
    index = sub.add_parser("index", help="build and inspect a document index (encode once, query many times)")
    isub = index.add_subparsers(dest="index_command", required=True)
    add = isub.add_parser(
        "add", help="add files and directories to the index in --store DIR",
        description="Add files and directories (recursively, hidden entries skipped) to the index in --store DIR. "
        "Files that are not text are skipped and listed; files that cannot be read are listed and make the exit code 1 "
        "(the others are added). DIR must be new, empty, or an index: a non-empty directory without one is refused.",
    )
    add.add_argument("paths", nargs="+", metavar="PATH")
    add.add_argument("--store", required=True, metavar="DIR", help="the index directory (created private, 0700, when new)")
    add.add_argument("--follow-links", action="store_true", help="follow symbolic links that lead outside a directory being added")
    add.add_argument("--size-limit", type=float, default=None, metavar="MiB", help="node store size limit (default 4096)")
    add.add_argument("--json", action="store_true", help="print the build report as JSON")
    add.add_argument("--lazy", action="store_true",
                     help="store text only and encode a chunk when a latent query first needs it (implies --policy lexical); "
                          "the index remembers it, and its policy, for `ask --store`")
    add.add_argument("--ray", action="store_true",
                     help="build with Ray Data: chunk on CPU workers, encode on a pool of actors (pip install 'sharedctx[ray]'; "
                          "see docs/distributed.md)")
    add.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="with --ray: the cluster to join ('auto' for a running one; default: start a local one)")
    add.add_argument("--ray-actors", type=int, default=2, metavar="N", help="with --ray: encoding actors (default 2)")
    add.add_argument("--ray-gpus-per-actor", type=float, default=0, metavar="G", help="with --ray: GPUs per actor (default 0)")
    add_model_args(add)
    add.set_defaults(func=_cmd_index_add, load_model=load_model)
    lst = isub.add_parser("list", help="list the documents of an index")
    lst.add_argument("--store", required=True, metavar="DIR")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--read-only", action="store_true",
                     help="write nothing (damaged records are reported, not quarantined); automatic when DIR is not writable")
    lst.set_defaults(func=_cmd_index_list)
    rm = isub.add_parser("remove", help="remove documents from an index")
    rm.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    rm.add_argument("--store", required=True, metavar="DIR")
    rm.set_defaults(func=_cmd_index_remove)
    prune = isub.add_parser(
        "prune", help="delete stored nodes no document refers to (left by `index remove`) and files left by interrupted "
        "writes; safe while others read the index"
    )
    prune.add_argument("--store", required=True, metavar="DIR")
    prune.add_argument("--json", action="store_true")
    prune.set_defaults(func=_cmd_index_prune)
    merge = isub.add_parser(
        "merge", help="merge store shards or other indexes (same model and options) into the index in --store DIR",
        description="Copy the chunks (each checksum checked) and documents of SHARD directories - node-store shards kept "
        "by a distributed build, or whole indexes - into the index in --store DIR. The shards are only read. A shard built "
        "by another base model or lower-side configuration is refused before anything is copied. A document in both with "
        "other contents keeps the copy written last (listed as a conflict); damaged records and entries that cannot be "
        "merged are listed as refused, and make the exit code 1.",
    )
    merge.add_argument("shards", nargs="+", metavar="SHARD")
    merge.add_argument("--store", required=True, metavar="DIR")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(func=_cmd_index_merge)
