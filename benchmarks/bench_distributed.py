"""Index build throughput on Ray (`sharedctx.distributed.build_index`, CPU actors) against one process
(`ContextIndex.add_many`): the same files, the same model, a fresh store for each, in one run; and a projection
to N actors from the measured per-actor throughput.

    python benchmarks/bench_distributed.py                        # default model, 64K tokens of Austen in 8 files, 2 actors
    python benchmarks/bench_distributed.py --quick --model tiny   # tiny random model, 4K tokens of the shipped texts: a smoke run

What is timed (wall clock; every model load and every `encode_chunks` call is logged with its times by the picklable
model factory `TimedModel`, in the driver and in each actor):

- **single process**: `ContextIndex.add_many` of the files with ``--threads`` torch threads (the model loaded before),
  once per value given (``--threads 2 1``: all cores, then one thread, the per-actor setting).
- **Ray**: ``ray.init`` (start-up of the local cluster, reported apart), then `build_index` with ``--actors`` actors
  of ``--actor-threads`` threads each, split at the first and last encoded batch into *start-up* (the driver's model
  load, reading and chunking on Ray Data, planning, starting the actors and loading their models), the *encode
  window* (steady state) and the *tail* (collecting root keys, merging the shards, writing the document records).
- **projection** (not a measurement): build time with N actors ``T(N) = S + C / (N * r)``, Amdahl-style, where S is
  the measured Ray build outside the encode window (taken as serial and constant in N), C the chunks encoded and r
  the measured per-actor throughput in the encode window (C / (window * actors)). The actors are CPU actors of the
  speed measured here: no GPU actor was measured, so no GPU speed enters the projection.

Both builds must hold the same chunk keys (checked). Writes benchmarks/results/distributed.json and .png
(``distributed_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    ROOT,
    add_data_arg,
    data_file,
    data_root,
    finish,
    model_info,
    plt,
    run,
)

BOOKS = ("pride_and_prejudice.txt", "emma.txt", "northanger_abbey.txt")  # shipped (opening chapters) and in the corpus
PROJECTED = (1, 2, 4, 8)


class TimedModel:
    """A picklable model factory (what `build_index` sends to every actor): sets the torch threads, loads the model
    (``tiny``: `sharedctx.testing.make_llm`; else `SharedLLM.from_pretrained`, None for the default model) and logs
    the load and every `encode_chunks` call (start, end, chunks, tokens) to ``log_dir/<pid>.jsonl``."""

    def __init__(self, model: str | None, threads: int, log_dir: str) -> None:
        self.model, self.threads, self.log_dir = model, threads, log_dir

    def _log(self, event: dict) -> None:
        with open(Path(self.log_dir) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def __call__(self):
        import torch

        torch.set_num_threads(self.threads)
        t0 = time.time()
        if self.model == "tiny":
            from sharedctx.testing import make_llm

            llm = make_llm("llama")
        else:
            from sharedctx import SharedLLM

            llm = SharedLLM.from_pretrained(self.model)
        self._log({"event": "load", "t0": t0, "t1": time.time()})
        encode = llm.encoder.encode_chunks

        def timed(chunks, *args, **kwargs):
            t = time.time()
            out = encode(chunks, *args, **kwargs)
            self._log({"event": "encode", "t0": t, "t1": time.time(), "chunks": len(chunks), "tokens": int(sum(c.numel() for c in chunks))})
            return out

        llm.encoder.encode_chunks = timed
        return llm


def events(log_dir: Path) -> dict[int, list[dict]]:
    """``{pid: [event, ...]}`` of a run's logs."""
    return {int(p.stem): [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(log_dir.glob("*.jsonl"))}


def write_corpus(folder: Path, tokenizer, args) -> dict:
    """``--tokens`` tokens of the books, cut at token boundaries into ``--files`` files of about equal size."""
    text = ""
    for name in BOOKS:
        text += data_file(f"books/{name}", args).read_text(encoding="utf-8") + "\n\n"
        if len(text) > 8 * args.tokens:
            break
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = min(args.tokens, len(offsets))
    cuts = [0] + [offsets[n * k // args.files][0] for k in range(1, args.files)] + [offsets[n - 1][1]]
    folder.mkdir(parents=True)
    for k in range(args.files):
        (folder / f"part{k:02d}.txt").write_text(text[cuts[k] : cuts[k + 1]], encoding="utf-8")
    return {"books": list(BOOKS), "files": args.files, "tokens_requested": args.tokens, "characters": cuts[-1]}


def chunk_keys(store: Path) -> set[str]:
    from sharedctx.index import DocumentTable

    table = DocumentTable(store, read_only=True)
    keys = {k for doc_id in table.ids() for k in table.get(doc_id).chunk_keys}
    table.close()
    return keys


def single_build(llm, threads: int, log_dir: Path, corpus: Path, store: Path, args) -> dict:
    """`ContextIndex.add_many` of the files into a fresh store with a model loaded before, on ``threads`` threads."""
    import torch

    from sharedctx.index import ContextIndex

    torch.set_num_threads(threads)
    t0 = time.time()
    with ContextIndex(llm, store, batch_chunks=args.batch_chunks) as index:
        report = index.add_many([corpus], show_progress=False)
    t1 = time.time()
    build_s = t1 - t0
    enc = [e for evs in events(log_dir).values() for e in evs if e["event"] == "encode" and t0 <= e["t0"] <= t1]
    busy = sum(e["t1"] - e["t0"] for e in enc)
    return {
        "threads": threads, "build_s": round(build_s, 3), "documents": report.documents, "chunks": report.chunks_encoded,
        "tokens": report.tokens, "chunks_per_s": round(report.chunks_encoded / build_s, 3), "tokens_per_s": round(report.tokens / build_s, 1),
        "encode_busy_s": round(busy, 3), "encode_chunks_per_busy_s": round(sum(e["chunks"] for e in enc) / busy, 3),
    }


def ray_build(load: TimedModel, corpus: Path, store: Path, args) -> dict:
    import ray

    from sharedctx.distributed import build_index

    if __name__ != "__main__":  # imported (the tests): send TimedModel to the actors by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.time()
    ray.init(num_cpus=args.actors * args.actor_threads, include_dashboard=False, configure_logging=False, log_to_driver=False)
    init_s = time.time() - t0
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.time()
        report = build_index([corpus], store, model=load, num_actors=args.actors, num_cpus_per_actor=args.actor_threads,
                             batch_chunks=args.batch_chunks)
        end = time.time()
    finally:
        ray.shutdown()
    if report.failed:
        raise RuntimeError(f"the Ray build failed documents: {report.failed}")
    log = events(Path(load.log_dir))
    enc = [e for evs in log.values() for e in evs if e["event"] == "encode"]
    first, last = min(e["t0"] for e in enc), max(e["t1"] for e in enc)
    chunks, tokens = report.chunks_encoded, report.tokens
    window = last - first
    actors = []
    for pid, evs in log.items():
        if pid == os.getpid():
            continue
        mine = [e for e in evs if e["event"] == "encode"]
        loaded = [e for e in evs if e["event"] == "load"]
        busy = sum(e["t1"] - e["t0"] for e in mine)
        actors.append({
            "model_load_s": round(sum(e["t1"] - e["t0"] for e in loaded), 3), "batches": len(mine),
            "chunks": sum(e["chunks"] for e in mine), "tokens": sum(e["tokens"] for e in mine), "encode_busy_s": round(busy, 3),
            "encode_chunks_per_busy_s": round(sum(e["chunks"] for e in mine) / busy, 3) if busy else None,
        })
    driver = [e for e in log.get(os.getpid(), []) if e["event"] == "load"]
    actor_loads = [e for pid, evs in log.items() if pid != os.getpid() for e in evs if e["event"] == "load"]
    build_s = end - start
    return {
        "actors": args.actors, "actor_threads": args.actor_threads, "ray_init_s": round(init_s, 3), "build_s": round(build_s, 3),
        "documents": report.documents, "chunks": chunks, "tokens": tokens,
        "chunks_per_s": round(chunks / build_s, 3), "tokens_per_s": round(tokens / build_s, 1),
        "with_ray_init": {"build_s": round(build_s + init_s, 3), "tokens_per_s": round(tokens / (build_s + init_s), 1)},
        "startup_s": round(first - start, 3),
        "driver_model_load_s": round(sum(e["t1"] - e["t0"] for e in driver), 3),
        # within start-up: when the first actor began loading the model (reading, chunking and planning were done
        # by then) and when the last one had it loaded, from the start of build_index
        "actors_start_loading_after_s": round(min(e["t0"] for e in actor_loads) - start, 3),
        "actors_loaded_after_s": round(max(e["t1"] for e in actor_loads) - start, 3),
        "encode_window_s": round(window, 3),
        "encode_window_chunks_per_s": round(chunks / window, 3), "encode_window_tokens_per_s": round(tokens / window, 1),
        "tail_s": round(end - last, 3),
        "per_actor_chunks_per_s": round(chunks / (window * args.actors), 4),
        "per_actor_tokens_per_s": round(tokens / (window * args.actors), 2),
        "per_actor": actors,
    }


def projection(ray: dict) -> dict:
    """Build time and throughput for N actors from the measured serial part and per-actor throughput."""
    serial = ray["build_s"] - ray["encode_window_s"]
    r, chunks, tokens = ray["per_actor_chunks_per_s"], ray["chunks"], ray["tokens"]
    rows = []
    for n in PROJECTED:
        t = serial + chunks / (n * r)
        rows.append({"actors": n, "build_s": round(t, 3), "chunks_per_s": round(chunks / t, 3), "tokens_per_s": round(tokens / t, 1),
                     "speedup_over_1": None})
    for row in rows:
        row["speedup_over_1"] = round(rows[0]["build_s"] / row["build_s"], 2)
    return {
        "projection": True,
        "formula": "T(N) = S + C / (N * r); throughput = C / T(N) chunks/s, tokens / T(N) tokens/s",
        "S_serial_s": round(serial, 3), "C_chunks": chunks, "tokens": tokens, "r_per_actor_chunks_per_s": r,
        "basis": (f"S: the measured Ray build outside the encode window (start-up {ray['startup_s']} s + tail {ray['tail_s']} s), "
                  "taken as serial and constant in N; r: the measured per-actor throughput in the encode window with "
                  f"{ray['actors']} CPU actors of {ray['actor_threads']} thread(s); ray.init excluded"),
        "caveat": ("a projection, not a measurement: N CPU actors of the speed measured here, each on its own cores; no GPU "
                   "actor was measured (no GPU on this machine), so this is no GPU figure. It ignores the growth of the "
                   "merge with C and any contention on the store's disk."),
        "rows": rows,
    }


def plot(result: dict, png: Path) -> None:
    pyplot = plt()
    if pyplot is None:
        return
    singles, ray, proj = result["single"], result["ray"], result["projected"]
    fig, (ax, bx) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    xs = [r["actors"] for r in proj["rows"]]
    ax.plot(xs, [r["tokens_per_s"] for r in proj["rows"]], "o--", color="tab:gray",
            label="projected: S + C/(N·r), CPU actors at the measured speed")
    for single, color in zip(singles, ("tab:blue", "tab:cyan", "tab:green")):
        ax.axhline(single["tokens_per_s"], color=color, label=f"measured: one process, {single['threads']} thread(s)")
    ax.plot([ray["actors"]], [ray["tokens_per_s"]], "s", color="tab:orange", markersize=9,
            label=f"measured: Ray, {ray['actors']} actors (ray.init excluded)")
    ax.plot([ray["actors"]], [ray["with_ray_init"]["tokens_per_s"]], "v", color="tab:red", markersize=8, label="measured: Ray, with ray.init")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("encoding actors")
    ax.set_ylabel("build throughput (tokens/s)")
    ax.set_title("build throughput (dashed: projected)")
    ax.legend(fontsize=8)
    parts = [("ray.init", ray["ray_init_s"], "tab:red"), ("start-up", ray["startup_s"], "tab:purple"),
             ("encode window", ray["encode_window_s"], "tab:orange"), ("tail (merge, records)", ray["tail_s"], "tab:brown")]
    left = 0.0
    for label, width, color in parts:
        bx.barh(1, width, left=left, color=color, label=label)
        left += width
    for y, (single, color) in enumerate(zip(singles, ("tab:blue", "tab:cyan", "tab:green")), start=1):
        bx.barh(-y, single["build_s"], color=color, label=f"one process, {single['threads']} thread(s)")
    bx.set_yticks([1] + [-y for y in range(1, len(singles) + 1)],
                  [f"Ray, {ray['actors']} actors"] + [f"one process, {s['threads']} thr." for s in singles])
    bx.set_xlabel("seconds (measured)")
    bx.set_title(f"{ray['chunks']} chunks, {ray['tokens']} tokens")
    bx.legend(fontsize=8)
    fig.suptitle(f"index build, {Path(str(result['model']['model'])).name}, {result['machine']['cpu_count']}-core {result['machine']['processor']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    pyplot.close(fig)


def table(result: dict) -> str:
    """The results as a markdown table, headed by the command and the machine (for docs/distributed.md)."""
    m, ray, proj = result["machine"], result["ray"], result["projected"]
    head = (f"`python benchmarks/{result['command']}` ({result['model']['model'].rsplit('/', 1)[-1]}, {ray['documents']} files, "
            f"{ray['tokens']} tokens, {ray['chunks']} chunks of up to {result['model']['config']['chunk_size']} tokens) on a "
            f"{m['cpu_count']}-core {m['processor']} (nproc {result['settings']['nproc']}), torch {m['torch']}, load average "
            f"{m['load_average_1m']}, {result['date']}, commit {result['git']}:")
    rows = ["| build | wall s | chunks/s | tokens/s |", "| --- | --- | --- | --- |"]
    for s in result["single"]:
        rows.append(f"| one process, `ContextIndex.add_many`, {s['threads']} thread(s) | {s['build_s']:.1f} | {s['chunks_per_s']:.2f} | {s['tokens_per_s']:.0f} |")
    rows.append(f"| Ray, `build_index`, {ray['actors']} CPU actors x {ray['actor_threads']} thread(s), without `ray.init` | "
                f"{ray['build_s']:.1f} | {ray['chunks_per_s']:.2f} | {ray['tokens_per_s']:.0f} |")
    rows.append(f"| the same with `ray.init` ({ray['ray_init_s']:.1f} s) | {ray['with_ray_init']['build_s']:.1f} | "
                f"{ray['chunks'] / ray['with_ray_init']['build_s']:.2f} | {ray['with_ray_init']['tokens_per_s']:.0f} |")
    rows.append(f"| Ray start-up: driver's model load, read and chunk, plan, actors started and loaded (actors loading from "
                f"{ray['actors_start_loading_after_s']:.1f} s to {ray['actors_loaded_after_s']:.1f} s) | {ray['startup_s']:.1f} | | |")
    rows.append(f"| Ray steady-state encode window, all actors (per actor: {ray['per_actor_tokens_per_s']:.0f} tokens/s) | "
                f"{ray['encode_window_s']:.1f} | {ray['encode_window_chunks_per_s']:.2f} | {ray['encode_window_tokens_per_s']:.0f} |")
    rows.append(f"| Ray tail: root keys, merge of the shards, document records | {ray['tail_s']:.1f} | | |")
    for r in proj["rows"]:
        rows.append(f"| *projected*, {r['actors']} actor(s) of the measured CPU speed: S + C/(N r), S = {proj['S_serial_s']:.1f} s | "
                    f"*{r['build_s']:.1f}* | *{r['chunks_per_s']:.2f}* | *{r['tokens_per_s']:.0f}* |")
    return "\n".join([head, "", *rows])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'tiny' (a tiny random model from sharedctx.testing), a model id or folder "
                                                  "(default: SmolLM2-135M-Instruct with its shipped adapter)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens of text to index (default 65536; 4096 with --quick)")
    ap.add_argument("--files", type=int, default=8, help="files the text is cut into")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--actor-threads", type=int, default=1, help="torch threads (and Ray CPUs) of each actor")
    ap.add_argument("--threads", type=int, nargs="+", default=None, metavar="N",
                    help="torch threads of the single-process build, one build per value (default: all cores; 1 with --model tiny)")
    ap.add_argument("--batch-chunks", type=int, default=4, help="chunks per encoded batch, in both builds")
    ap.add_argument("--out", default=None, help="folder for JSON and PNG (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="output name instead of distributed")
    ap.add_argument("--quick", action="store_true", help="4K tokens of the shipped texts in 4 files: a smoke run")
    ap.add_argument("--table", metavar="JSON", default=None, help="print the markdown table of a written result and exit")
    add_data_arg(ap)
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return {}
    if args.threads is None:
        args.threads = [1 if args.model == "tiny" else os.cpu_count() or 1]
    if args.tokens is None:
        args.tokens = 4096 if args.quick else 65536
    if args.quick and "--files" not in (argv if argv is not None else sys.argv):
        args.files = 4
    data_file(f"books/{BOOKS[0]}", args)  # a missing corpus fails before anything loads
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        for folder in ("single-log", "ray-log"):
            (work / folder).mkdir()
        llm = TimedModel(args.model, args.threads[0], str(work / "single-log"))()  # loaded before the builds are timed
        corpus = write_corpus(work / "corpus", llm.tokenizer, args)
        singles = [single_build(llm, t, work / "single-log", work / "corpus", work / f"single-store-{i}", args)
                   for i, t in enumerate(args.threads)]
        ray = ray_build(TimedModel(args.model, args.actor_threads, str(work / "ray-log")), work / "corpus", work / "ray-store", args)
        keys = [chunk_keys(work / f"single-store-{i}") for i in range(len(singles))] + [chunk_keys(work / "ray-store")]
        same = all(k == keys[0] for k in keys)
        if not same:
            raise RuntimeError("the Ray build and the single-process build hold different chunks")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    root, why = data_root(args)
    info = model_info(llm)
    if args.model == "tiny":
        info["model"] = "tiny random Llama (sharedctx.testing.make_llm)"
    result = {
        "command": " ".join(["bench_distributed.py", *(sys.argv[1:] if argv is None else argv)]),  # also when called as main(argv)
        "model": info,
        "data": {"root": root.relative_to(ROOT).as_posix() if root.resolve().is_relative_to(ROOT) else str(root), "why": why, **corpus},
        "settings": {"actors": args.actors, "actor_threads": args.actor_threads, "single_threads": args.threads,
                     "batch_chunks": args.batch_chunks, "nproc": os.cpu_count()},
        "single": singles,
        "ray": ray,
        "same_chunk_keys": same,
        # Ray's build throughput over each single-process build's (keyed by its threads); with ray.init counted
        "ray_over_single_throughput": {str(s["threads"]): round(ray["tokens_per_s"] / s["tokens_per_s"], 3) for s in singles},
        "ray_with_init_over_single_throughput": {str(s["threads"]): round(ray["with_ray_init"]["tokens_per_s"] / s["tokens_per_s"], 3)
                                                 for s in singles},
        "projected": projection(ray),
    }
    written = finish("distributed", result, args, plot)
    print(table(written))
    return written


if __name__ == "__main__":
    run(main)
