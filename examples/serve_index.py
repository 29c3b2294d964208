"""Answer questions from one index in several processes: a process pool, or a Ray Serve deployment.

Each answering process loads the model once and opens the index with ``read_only=True``: an immutable snapshot that
it never writes (no lock, no journal, no access times), so any number of processes share one store directory, even
on a read-only mount. Build the index first, in one process, and close it::

    sharedctx index add --store ./index corpus/
    python examples/serve_index.py --store ./index "Who is Mr. Darcy?" "Where does Bingley live?"
    python examples/serve_index.py --store ./index --pool serve --workers 2 "Who is Mr. Darcy?"
    python examples/serve_index.py --store ./index --pool serve --keep-serving   # then, from anywhere:
    curl -X POST localhost:8000/ask -d '{"question": "Who is Mr. Darcy?"}'

``--pool process`` (default) needs nothing beyond sharedctx; ``--pool serve`` needs ``pip install 'sharedctx[ray]'``.
See docs/distributed.md, "Serving an index".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from sharedctx import ContextIndex, SharedLLM


def open_index(store: str, load: Callable[[], SharedLLM], threads: int) -> ContextIndex:
    """What every answering process does once: load the model, open the index read-only."""
    import torch

    torch.set_num_threads(threads)
    return ContextIndex.load(store, load(), read_only=True)


def answer(index: ContextIndex, question: str, max_new_tokens: int) -> dict[str, Any]:
    """One question, greedy decoding; a plain dict that pickles and serialises to JSON."""
    ans = index.query(question, max_new_tokens=max_new_tokens, temperature=0.0)
    return {"question": question, "text": ans.text, "token_ids": ans.token_ids,
            "documents": sorted({c.doc_id for c in ans.citations}), "pid": os.getpid()}


# ---------------------------------------------------------------------- a plain process pool
_INDEX: ContextIndex | None = None  # one per worker process


def _init_worker(store: str, load: Callable[[], SharedLLM], threads: int) -> None:
    global _INDEX
    _INDEX = open_index(store, load, threads)


def _ask(question: str, max_new_tokens: int) -> dict[str, Any]:
    assert _INDEX is not None
    return answer(_INDEX, question, max_new_tokens)


def ask_with_processes(store: str, questions: list[str], load: Callable[[], SharedLLM], *, workers: int = 2,
                       max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """Answer ``questions`` on a pool of ``workers`` processes (spawned, so none inherits the parent's threads)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(store, load, threads)) as pool:
        return list(pool.map(_ask, questions, [max_new_tokens] * len(questions)))


# ---------------------------------------------------------------------- a Ray Serve deployment
class Answerer:
    """A Serve replica: one model and one read-only index per replica. Answers `ask` calls from a handle, and
    HTTP POSTs of ``{"question": ..., "max_new_tokens": ...}``."""

    def __init__(self, store: str, load: Callable[[], SharedLLM], threads: int) -> None:
        self.index = open_index(store, load, threads)

    def ask(self, question: str, max_new_tokens: int = 64) -> dict[str, Any]:
        return answer(self.index, question, max_new_tokens)

    async def __call__(self, request) -> dict[str, Any]:
        body = await request.json()
        return self.ask(body["question"], int(body.get("max_new_tokens", 64)))


def deploy(store: str, load: Callable[[], SharedLLM], *, workers: int = 2, threads: int = 1, http: bool = False):
    """Start ``workers`` Serve replicas of `Answerer` (one CPU each; add ``"num_gpus": 1`` to put each on a GPU)
    and return the deployment's handle. Call ``ray.init`` first to choose the cluster."""
    import ray
    from ray import serve

    if __name__ != "__main__":  # imported (as in the tests): send this module's code to the replicas by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    serve.start(proxy_location="HeadOnly" if http else "Disabled")
    app = serve.deployment(Answerer, num_replicas=workers, ray_actor_options={"num_cpus": 1}).bind(store, load, threads)
    return serve.run(app, name="sharedctx", route_prefix="/ask")


def ask_with_serve(store: str, questions: list[str], load: Callable[[], SharedLLM], *, workers: int = 2,
                   max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """Answer ``questions`` on a Ray Serve deployment of ``workers`` replicas, then shut it down."""
    from ray import serve

    handle = deploy(store, load, workers=workers)
    try:
        responses = [handle.ask.remote(q, max_new_tokens) for q in questions]  # sent at once, spread over replicas
        return [r.result() for r in responses]
    finally:
        serve.delete("sharedctx")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("questions", nargs="*")
    ap.add_argument("--store", required=True, help="an index directory built before (sharedctx index add)")
    ap.add_argument("--model", default=None, help="base model id or folder the index was built with (default: the default model)")
    ap.add_argument("--pool", choices=("process", "serve"), default="process")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--keep-serving", action="store_true", help="--pool serve: keep the HTTP endpoint up (Ctrl-C ends)")
    args = ap.parse_args(argv)
    load = functools.partial(SharedLLM.from_pretrained, args.model)
    if args.pool == "process":
        answers = ask_with_processes(args.store, args.questions, load, workers=args.workers, max_new_tokens=args.max_new_tokens)
    elif args.keep_serving:
        import time

        deploy(args.store, load, workers=args.workers, http=True)
        print("serving: curl -X POST localhost:8000/ask -d '{\"question\": \"...\"}'", flush=True)
        while True:
            time.sleep(3600)
    else:
        answers = ask_with_serve(args.store, args.questions, load, workers=args.workers, max_new_tokens=args.max_new_tokens)
    for a in answers:
        print(json.dumps({k: a[k] for k in ("question", "text", "documents", "pid")}))


if __name__ == "__main__":
    main()
