"""Do reworded questions find their chunk? Top-1 chunk accuracy of lexical, hybrid and MiniLM chunk ranking.

    python benchmarks/bench_rewording.py                 # default model's tokenizer, all-MiniLM-L6-v2; minutes
    python benchmarks/bench_rewording.py --quick         # the shipped texts, one short length

The first step of `ContextIndex.retrieve` ranks every chunk of every document for the question; the answer can only be
read from the chunks kept. This measures that step, on two sets of questions, in one run:

- ``reworded``: benchmarks/data/rewording.json, questions written in other words than the passage that answers them
  (synonyms, paraphrase, other inflections) over the sample document, a novel, a Python package and a TeX manual,
  all in ONE index (so a question competes with every chunk of every document). Gold: the chunks that overlap the
  quoted passage.
- ``finding``: the finding benchmark's tasks (passkey, RULER-style needles, variable tracking; `bench_finding.py`) at
  ``--lengths``, one index per trial. Gold: the chunks that hold an answer.

Arms, each ranking the same chunks of the same index (``encode="lazy"``: nothing is encoded, only tokenised):

- ``lexical_unstemmed``: BM25 over surface words, the tokenizer before stemming (``BM25(texts, stem=False)``);
- ``lexical``: the index's own ranking under ``policy="lexical"`` (BM25 over Snowball stems, the lexicon);
- ``minilm``: all-MiniLM-L6-v2 alone: cosine of the question with each chunk's best piece of at most 128 tokens
  (the dense half of the hybrid ranker);
- ``hybrid``: ``ContextIndex(policy="lexical", embedder=...)``: reciprocal rank fusion (k = 60) of the two above.

Top-1 = a gold chunk ranked first (ties in document order, as the index breaks them); also recall@3 and the mean
reciprocal rank. ``library_agrees`` checks that `ContextIndex.retrieve` keeps the same first chunk as the ``lexical``
and ``hybrid`` arms. Writes benchmarks/results/rewording.json and .png.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import FILLER, ROOT, MissingData, add_model_args, data_file, finish, load_llm, model_info, plt, run
from _tasks import TASK_NAMES, filler_tokens, make_task

QUESTIONS = ROOT / "benchmarks" / "data" / "rewording.json"
ARMS = ("lexical_unstemmed", "lexical", "minilm", "hybrid")
KS = (1, 3)


# ---------------------------------------------------------------------- ranking one index's chunks
def chunk_spans(doc) -> list[tuple[int, int]]:
    """Character span of each chunk of an index document."""
    return [(int(doc.offsets[int(doc.bounds[c]), 0]), int(doc.offsets[int(doc.bounds[c + 1]) - 1, 1])) for c in range(doc.n_chunks)]


def gold_chunks(forest, doc_id: str, spans: list[tuple[int, int]]) -> list[int]:
    """Forest positions of the chunks of ``doc_id`` that overlap any of the character ``spans``."""
    out = []
    for i, (doc, c) in enumerate(forest.entries):
        if doc.doc_id == doc_id:
            a, b = chunk_spans(doc)[c]
            if any(s < b and a < e for s, e in spans):
                out.append(i)
    return out


class Ranker:
    """The arms over one index: ``scores(question) -> {arm: (n_chunks,) scores}`` in the forest's order."""

    def __init__(self, index, embedder) -> None:
        from sharedctx.index.lexicon import chunk_texts
        from sharedctx.ops.scoring import BM25

        self.index, self.forest = index, index.live.forest()
        self.unstemmed = BM25([t for d in self.forest.docs for t in chunk_texts(d)], stem=False)
        self.dense, self.embed_s = None, 0.0
        if embedder is not None:
            from sharedctx.index.embedding import ChunkEmbeddings

            t0 = time.perf_counter()
            self.embeddings = ChunkEmbeddings(embedder)
            self.dense = self.forest.dense(self.embeddings)
            self.embed_s = time.perf_counter() - t0

    def scores(self, question: str) -> dict[str, torch.Tensor]:
        from sharedctx.ops.scoring import reciprocal_rank_fusion

        out = {"lexical_unstemmed": self.unstemmed.scores(question), "lexical": self.forest.lexicon().scores(question)}
        if self.dense is not None:
            out["minilm"] = self.dense.scores(question)
            out["hybrid"] = reciprocal_rank_fusion([out["lexical"], out["minilm"]])
        return out


def rank_of(scores: torch.Tensor, gold: list[int]) -> int:
    """0-based rank of the best gold chunk, ties broken in document order (stable sort, as `rank_chunks`)."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    where = {c: r for r, c in enumerate(order)}
    return min(where[g] for g in gold)


def first_kept(index, question: str) -> tuple[str, int]:
    """The chunk `ContextIndex.retrieve` ranks first (the best chunk score among its citations)."""
    best = max(index.retrieve(question, top_k_chunks=1), key=lambda c: c.chunk_score)
    return best.doc_id, best.chunk


def summarize(ranks: list[int]) -> dict:
    return {**{f"top{k}" if k == 1 else f"recall@{k}": round(float(np.mean([r < k for r in ranks])), 3) for k in KS},
            "mrr": round(float(np.mean([1.0 / (r + 1) for r in ranks])), 3), "n": len(ranks)}


# ---------------------------------------------------------------------- the two question sets
def read_questions(args) -> tuple[list[dict], dict[str, Path], list[str]]:
    """The reworded questions whose documents are found, their documents, and (``--quick`` only) the ids skipped."""
    data = json.loads(Path(args.questions).read_text())
    docs, kept, skipped = {}, [], []
    for q in data["questions"]:
        try:
            path = ROOT / q["doc"] if q["doc"].startswith("examples/") else data_file(q["doc"], args)
        except MissingData:
            if not args.quick:
                raise
            skipped.append(q["id"])
            continue
        text = path.read_text(encoding="utf-8")
        if not re.search(r"\s+".join(map(re.escape, q["evidence"].split())), text):
            if args.quick:  # the shipped excerpts hold only the openings of the novels
                skipped.append(q["id"])
                continue
            raise SystemExit(f"error: the evidence of {q['id']} is not in {q['doc']}")
        docs[q["doc"]] = path
        kept.append(q)
    return kept, docs, skipped


def run_reworded(args, llm, embedder, questions: list[dict], paths: dict[str, Path], skipped: list[str]) -> dict:
    from sharedctx import ContextIndex

    with ContextIndex(llm, None, encode="lazy", policy="lexical", max_batch_queries=1) as index:
        for name, path in paths.items():
            index.add_text(path.read_text(encoding="utf-8"), doc_id=name)
        ranker = Ranker(index, embedder)
        hybrid = None
        if embedder is not None:  # the same index with the hybrid ranker, sharing the embeddings just made
            hybrid = ContextIndex(llm, index.directory, max_batch_queries=1, embedder=embedder)
            hybrid.embeddings = ranker.embeddings
        per, agree = [], {"lexical": 0, "hybrid": 0}
        times: dict[str, list[float]] = {"lexical": [], "hybrid": []}
        for q in questions:
            text = paths[q["doc"]].read_text(encoding="utf-8")
            pat = r"\s+".join(map(re.escape, q["evidence"].split()))
            gold = gold_chunks(ranker.forest, q["doc"], [m.span() for m in re.finditer(pat, text)])
            scores = ranker.scores(q["question"])
            ranks = {arm: rank_of(s, gold) for arm, s in scores.items()}
            for arm, ix in (("lexical", index), ("hybrid", hybrid)):
                if ix is None:
                    continue
                t0 = time.perf_counter()
                doc_id, c = first_kept(ix, q["question"])
                times[arm].append(time.perf_counter() - t0)
                top = int(torch.argsort(scores[arm], descending=True, stable=True)[0])
                agree[arm] += ranker.forest.entries[top][0].doc_id == doc_id and ranker.forest.entries[top][1] == c
            per.append({"id": q["id"], "doc": q["doc"], "gold": gold, "ranks": ranks})
            print(f"{q['id']} gold {gold}  " + "  ".join(f"{a} {r}" for a, r in ranks.items()), flush=True)
        if hybrid is not None:
            hybrid.close()
        arms = [a for a in ARMS if per and a in per[0]["ranks"]]
        return {
            "documents": {name: {"chunks": d.n_chunks, "tokens": int(d.ids.numel())} for name, d in ((x.doc_id, x) for x in ranker.forest.docs)},
            "chunks": len(ranker.forest.entries),
            "questions": len(per),
            "skipped": skipped,
            "accuracy": {a: summarize([p["ranks"][a] for p in per]) for a in arms},
            "library_agrees": {a: f"{agree[a]}/{len(per)}" for a in agree if times[a]},
            "retrieve_ms_median": {a: round(1000 * statistics.median(t), 1) for a, t in times.items() if t},
            "embed_s": round(ranker.embed_s, 1),
            "pieces_embedded": ranker.embeddings.counts["pieces_embedded"] if embedder is not None else 0,
            "per_question": per,
        }


def run_finding(args, llm, embedder, filler_path: Path) -> dict:
    from sharedctx import ContextIndex

    filler = filler_tokens(llm.tokenizer, filler_path.read_text(encoding="utf-8"))
    rng = np.random.default_rng(args.seed)
    trials = []
    for length in args.lengths:
        for name in args.tasks:
            for t in range(args.trials):
                depth = args.depths[t % len(args.depths)]
                task = make_task(name, llm.tokenizer, rng, length=length, depth=depth, filler=filler)
                with ContextIndex(llm, None, encode="lazy", policy="lexical", max_batch_queries=1) as index:
                    index.add_text(task.context, doc_id="context")
                    ranker = Ranker(index, embedder)
                    spans = [m.span() for a in task.answers for m in re.finditer(re.escape(a), task.context)]
                    gold = gold_chunks(ranker.forest, "context", spans)
                    ranks = {arm: rank_of(s, gold) for arm, s in ranker.scores(task.question).items()}
                trials.append({"length": length, "task": name, "depth": depth, "chunks": len(ranker.forest.entries), "gold": gold,
                               "ranks": ranks, "embed_s": round(ranker.embed_s, 2)})
                print(f"{length:>6} {name:16s} d={depth:.2f} gold {gold}/{len(ranker.forest.entries)}  "
                      + "  ".join(f"{a} {r}" for a, r in ranks.items()), flush=True)
    arms = [a for a in ARMS if trials and a in trials[0]["ranks"]]
    return {
        "tasks": args.tasks, "lengths": args.lengths, "trials_per_task": args.trials,
        "accuracy": {a: {str(n): summarize([t["ranks"][a] for t in trials if t["length"] == n]) for n in args.lengths} for a in arms},
        "accuracy_all": {a: summarize([t["ranks"][a] for t in trials]) for a in arms},
        "trials": trials,
    }


def load_embedder_or_reason(name: str):
    from sharedctx.errors import MissingDependencyError
    from sharedctx.index.embedding import load_embedder

    try:
        return load_embedder(name), None
    except (MissingDependencyError, OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[16384, 32768])
    ap.add_argument("--questions", default=str(QUESTIONS), help="the reworded questions (JSON)")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2", help="sentence-transformers model of the minilm and hybrid arms")
    ap.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    ap.add_argument("--trials", type=int, default=3, help="finding trials per task and length (depths cycle)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--filler", default=FILLER, help="haystack prose of the finding tasks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.trials, args.tasks = args.lengths or [2048], 1, args.tasks[:2]
    args.lengths = args.lengths or [16384, 32768]
    questions = read_questions(args)  # every text is found before the model loads
    filler_path = data_file(args.filler, args)
    llm = load_llm(args, policy="lexical")
    embedder, not_run = load_embedder_or_reason(args.embedder)
    t0 = time.perf_counter()
    reworded = run_reworded(args, llm, embedder, *questions)
    finding = run_finding(args, llm, embedder, filler_path)
    result = {
        **model_info(llm),
        "embedder": args.embedder,
        "arms": [a for a in ARMS if a in reworded["accuracy"]],
        "not_run": {"minilm": not_run, "hybrid": not_run} if not_run else {},
        "chunk_size": llm.config.chunk_size,
        "seconds": round(time.perf_counter() - t0, 1),
        "reworded": reworded,
        "finding": finding,
    }
    return finish("rewording", result, args, plot)


def plot(result: dict, png: Path) -> None:
    pyplot = plt()
    if pyplot is None:
        return
    arms = result["arms"]
    groups = [("reworded", f"{result['reworded']['questions']} reworded questions", result["reworded"]["accuracy"])]
    for n in result["finding"]["lengths"]:
        groups.append((f"finding {n}", f"finding tasks, {int(n) // 1024}K tokens",
                       {a: result["finding"]["accuracy"][a][str(n)] for a in arms}))
    fig, ax = pyplot.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        ax.bar(np.arange(len(groups)) + j * width, [g[2][arm]["top1"] for g in groups], width, label=arm)
    ax.set_xticks(np.arange(len(groups)) + width * (len(arms) - 1) / 2, [g[1] for g in groups], fontsize=8)
    ax.set_ylabel("top-1 chunk accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"chunk ranking: which chunk comes first? ({result['reworded']['chunks']} chunks in the reworded index)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    pyplot.close(fig)


if __name__ == "__main__":
    run(main)
