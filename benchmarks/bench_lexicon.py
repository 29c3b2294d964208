"""Lexical ranking as the corpus grows: the old BM25 scan against the inverted lexicon, at ~1M and ~10M tokens.

    python benchmarks/bench_lexicon.py                          # ../shared/data (--data), 1M and 10M tokens; minutes
    python benchmarks/bench_lexicon.py --sizes 1000000 3000000  # other sizes
    python benchmarks/bench_lexicon.py --quick                  # the texts shipped in benchmarks/data, seconds

What is measured is the ranking step of `ContextIndex.retrieve` under the ``lexical`` policy alone, for each of
25 questions about the corpus (books, code, TeX): scores of every chunk for the question and `rank_chunks` of the
best ``top_k`` = 8. No model encodes anything.

- **scan**: `sharedctx.ops.scoring.BM25` over every chunk's text (what `Forest.lexicon()` was): build = counting
  every chunk, paid again on the first query after any document is added or removed; query = a Python loop over
  every chunk.
- **inverted**: `sharedctx.index.lexicon.ChunkLexicon` kept in a temporary ``DIR/lexicon``: build = counting
  every document and writing its segment; open = loading the segments back (checksums checked) and building the
  postings; add = one new document (counted, written, indexed) then its first query; delete = one document
  removed and the postings rebuilt.
- **index** (unless ``--no-index``): the same documents added with `ContextIndex.add_text` to an index with
  ``policy="lexical", encode="lazy"`` (tokenised, records and word counts written; no lower-model pass), reopened
  with `ContextIndex.load`, then `ContextIndex.retrieve` end to end: the question tokenised, chunks ranked, the kept
  trees walked with BM25 of their nodes' text, citations made. Its token count is the tokenizer's own for the
  varied copies too.

Both rank the same chunks: the scores are compared (``same_rankings``: identical order of every chunk for every
question; ``max_abs_score_diff``).

The corpus: every file under books/, code/ and math/ of the corpus folder, interleaved across the folders, cut
into chunks exactly as the index does (`sharedctx.index.chunking.chunk_text` with the default model's tokenizer,
``--chunk-size`` 1024 tokens), so token counts are the tokenizer's, not estimated from words. Past the corpus's own
size (~3.6M tokens for ../shared/data) it is repeated with variation: in copy k, 15 % of the word types (chosen by
a hash) have their letters rotated by k, the same length, so chunk boundaries and token counts are the original's
(an estimate for the varied copies) and the vocabulary grows as a real corpus's does. Query latency: median and
p95 over ``--repeats`` rounds of all questions. Writes benchmarks/results/lexicon.json and .png
(``lexicon_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from _common import add_data_arg, data_root, finish, plt, run

QUESTIONS = (
    "Who does Emma Woodhouse hope will marry Harriet Smith?",
    "What does Mr. Darcy say about Elizabeth at the Meryton assembly?",
    "Why does Catherine Morland go to Bath with the Allens?",
    "How does Fanny Price come to live at Mansfield Park?",
    "What happens to Marianne Dashwood when she walks in the rain?",
    "Who does Elinor Dashwood marry at the end?",
    "What does Mr. Knightley tell Emma after the picnic at Box Hill?",
    "How many daughters do Mr. and Mrs. Bennet have?",
    "What did God create on the first day in Genesis?",
    "What did Moses see in the burning bush?",
    "Who killed Goliath with a sling and a stone?",
    "What happens to the prodigal son when he comes home to his father?",
    "How does asyncio create a task from a coroutine and schedule it on the event loop?",
    "What does argparse do when a required argument is missing?",
    "How are dataclass fields with a default_factory initialised?",
    "How does subprocess.run capture stdout and stderr with a timeout?",
    "How does the logging module propagate a record to the handlers of parent loggers?",
    "How does pathlib resolve a relative path against the current directory?",
    "How do I extract the members of a tar archive safely with tarfile?",
    "What does json.dumps do with sort_keys and indent?",
    "How does unittest discover test modules in a directory?",
    "How do I compute the determinant of a matrix in PARI/GP?",
    "How do I factor a polynomial over a finite field in GP?",
    "What is the default precision of real numbers and how do I change it?",
    "How does GP define a user function with local variables?",
)
FOLDERS = ("books", "code", "math")
TOP_K = 8


# ---------------------------------------------------------------------- the corpus
def model_of(args):
    """``(llm or None, tokenizer, name)``: the model (for ``--index``, loaded without an adapter: nothing is encoded)
    or only its tokenizer."""
    from sharedctx.base_model import DEFAULT_MODEL_NAME, default_model_path

    name = str(args.model) if args.model else DEFAULT_MODEL_NAME
    if args.index:
        from sharedctx import SharedCtxConfig, SharedLLM

        llm = SharedLLM.from_pretrained(args.model, adapter=False, config=SharedCtxConfig(chunk_size=args.chunk_size, policy="lexical"))
        return llm, llm.tokenizer, name
    from transformers import AutoTokenizer

    return None, AutoTokenizer.from_pretrained(args.model or default_model_path(show_progress=False)), name


def base_files(root: Path) -> list[Path]:
    """Every text file under the corpus folders, interleaved across folders (a prefix of the list mixes them)."""
    lists = [sorted(p for p in (root / f).glob("*") if p.is_file()) for f in FOLDERS if (root / f).is_dir()]
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [files[i] for files in lists if i < len(files)]
    if not out:
        raise SystemExit(f"error: no text files under {root}/{{{','.join(FOLDERS)}}}; give the corpus folder with --data DIR")
    return out


class Base:
    """One corpus file cut into chunks as the index cuts it: token ids, character offsets, chunk bounds."""

    def __init__(self, path: Path, tokenizer, chunk_size: int) -> None:
        from sharedctx.index.chunking import chunk_text

        self.name = path.stem
        self.text = path.read_text(encoding="utf-8", errors="replace")
        chunks = list(chunk_text(self.text, tokenizer, chunk_size))
        self.ids = torch.cat([c.ids for c in chunks])
        self.offsets = torch.cat([c.offsets for c in chunks])
        self.bounds = torch.cumsum(torch.tensor([0] + [c.n_tokens for c in chunks]), 0)

    @property
    def tokens(self) -> int:
        return int(self.bounds[-1])


_WORD = re.compile(r"[A-Za-z]+")


def vary(text: str, k: int) -> str:
    """Copy ``k`` of ``text``: the letters of 15 % of the word types (by a hash) rotated by ``k``, same length."""
    if k == 0:
        return text
    memo: dict[str, str] = {}

    def rotate(m: re.Match) -> str:
        w = m.group(0)
        if w not in memo:
            chosen = zlib.crc32(f"{k}:{w.lower()}".encode()) % 100 < 15
            memo[w] = "".join(chr((ord(c) - base + k) % 26 + base) for c in w for base in [65 if c.isupper() else 97]) if chosen else w
        return memo[w]

    return _WORD.sub(rotate, text)


def make_doc(base: Base, k: int, n_chunks: int | None, seq: int, suffix: str = ""):
    """A document record of copy ``k`` of ``base`` (its first ``n_chunks`` chunks), as `ingest_text` writes one."""
    from sharedctx.diagnostics import DocumentRecord

    n = base.bounds.numel() - 1 if n_chunks is None else n_chunks
    t = int(base.bounds[n])
    text = vary(base.text, k)[: int(base.offsets[t - 1, 1])]
    return DocumentRecord(f"{base.name}#{k}{suffix}", seq, text, base.ids[:t], base.offsets[:t], base.bounds[: n + 1],
                torch.zeros(n, 1), [f"chunk/{base.name}/{k}/{c}" for c in range(n)], {}, None)


def corpus(bases: list[Base], tokens: int) -> tuple[list, int]:
    """Documents (copies of the base files in turn, the last one cut at a chunk) holding ~``tokens`` tokens."""
    docs, total, k = [], 0, 0
    while total < tokens:
        for base in bases:
            if total >= tokens:
                break
            need = tokens - total
            n = None
            if base.tokens > need:  # the last document: as many chunks as reach the size
                n = int(np.searchsorted(base.bounds.numpy(), need)) or 1
            doc = make_doc(base, k, n, seq=len(docs))
            docs.append(doc)
            total += int(doc.bounds[-1])
        k += 1
    return docs, total


# ---------------------------------------------------------------------- measuring
def latency(score, questions, repeats: int) -> tuple[dict, list]:
    """Median, p95 and mean in ms of ``score(q)`` + `rank_chunks` over ``repeats`` rounds; the last round's top chunks."""
    from sharedctx.policy import rank_chunks

    for q in questions[:2]:  # warm-up
        rank_chunks(score(q), top_k=TOP_K)
    times, tops = [], []
    for r in range(repeats):
        for q in questions:
            t0 = time.perf_counter()
            top = rank_chunks(score(q), top_k=TOP_K)
            times.append(1000 * (time.perf_counter() - t0))
            if r == repeats - 1:
                tops.append(top)
    return stats_ms(times), tops


def stats_ms(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 3), "p95": round(float(np.percentile(times, 95)), 3),
            "mean": round(statistics.fmean(times), 3), "n": len(times)}


def measure_index(llm, docs: list, args) -> dict:
    """`ContextIndex.add_text` of ``docs`` (lazy, lexical), `ContextIndex.load`, then `retrieve` latency."""
    from sharedctx import ContextIndex

    with tempfile.TemporaryDirectory(prefix="sharedctx-lexicon-index-") as tmp:
        store = Path(tmp) / "ix"
        index = ContextIndex(llm, store, policy="lexical", encode="lazy", max_batch_queries=1)
        t0 = time.perf_counter()
        for doc in docs:
            index.add_text(doc.text, doc_id=doc.doc_id)
        add_s = time.perf_counter() - t0
        index.close()
        t0 = time.perf_counter()
        index = ContextIndex.load(store, llm, max_batch_queries=1)
        open_s = time.perf_counter() - t0
        infos = index.documents()
        times: list[float] = []
        for q in QUESTIONS[:2]:
            index.retrieve(q)
        for _ in range(args.repeats):
            for q in QUESTIONS:
                t0 = time.perf_counter()
                index.retrieve(q)
                times.append(1000 * (time.perf_counter() - t0))
        index.close()
    return {"tokens": sum(i.tokens for i in infos), "chunks": sum(i.chunks for i in infos), "add_s": round(add_s, 2),
            "open_s": round(open_s, 3), "retrieve_ms": stats_ms(times)}


def measure(bases: list[Base], tokens: int, args, log, llm=None) -> dict:
    from sharedctx.index.lexicon import ChunkLexicon, chunk_texts
    from sharedctx.ops.scoring import BM25

    docs, total = corpus(bases, tokens)
    texts = [t for d in docs for t in chunk_texts(d)]
    log(f"{total:,} tokens: {len(docs)} documents, {len(texts):,} chunks")
    row: dict = {"target_tokens": tokens, "tokens": total, "documents": len(docs), "chunks": len(texts)}

    t0 = time.perf_counter()
    scan = BM25(texts)
    row["scan"] = {"build_s": round(time.perf_counter() - t0, 3)}
    row["scan"]["query_ms"], scan_tops = latency(scan.scores, QUESTIONS, args.repeats)
    log(f"  scan: build {row['scan']['build_s']} s, query {row['scan']['query_ms']}")

    with tempfile.TemporaryDirectory(prefix="sharedctx-lexicon-") as tmp:
        lexicon = ChunkLexicon(Path(tmp) / "lexicon")
        t0 = time.perf_counter()
        lexicon.view(docs)
        build_s = time.perf_counter() - t0
        lexicon.close()
        lexicon = ChunkLexicon(Path(tmp) / "lexicon")  # a fresh process opening the index
        t0 = time.perf_counter()
        view = lexicon.view(docs)
        open_s = time.perf_counter() - t0
        inv: dict = {"build_s": round(build_s, 3), "open_s": round(open_s, 3), "tiers": len(view.tiers),
                     "postings": int(sum(t.nnz for t in view.tiers)), "vocabulary": len(lexicon.vocab)}
        inv["query_ms"], inv_tops = latency(view.scores, QUESTIONS, args.repeats)
        diffs = [float((view.scores(q) - scan.scores(q)).abs().max()) for q in QUESTIONS]
        same = all(torch.equal(torch.argsort(view.scores(q), descending=True, stable=True),
                               torch.argsort(scan.scores(q), descending=True, stable=True)) for q in QUESTIONS)
        row["same_rankings"] = bool(same and inv_tops == scan_tops)
        row["max_abs_score_diff"] = max(diffs)

        # one document added at a time (cut from a copy the corpus does not hold), then its first query
        adds, parts = [], {"count_write_s": [], "reindex_s": [], "first_query_s": []}
        held = list(docs)
        k_new = 1 + max(int(d.doc_id.rsplit("#", 1)[1].split("+")[0]) for d in docs)
        for i in range(args.updates):
            base = bases[i % len(bases)]
            n = int(min(base.bounds.numel() - 1, max(1, round(args.update_tokens / args.chunk_size))))
            doc = make_doc(base, k_new, n, seq=len(held), suffix=f"+{i}")
            t0 = time.perf_counter()
            seg = lexicon.segment(doc)
            lexicon.put(doc, seg)
            t1 = time.perf_counter()
            held.append(doc)
            view = lexicon.view(held)
            t2 = time.perf_counter()
            view.scores(QUESTIONS[i % len(QUESTIONS)])
            t3 = time.perf_counter()
            parts["count_write_s"].append(t1 - t0)
            parts["reindex_s"].append(t2 - t1)
            parts["first_query_s"].append(t3 - t2)
            adds.append((int(doc.bounds[-1]), t3 - t0))
        inv["add_document"] = {
            "documents": len(adds), "tokens_each": [a for a, _ in adds], "median_s": round(statistics.median(s for _, s in adds), 4),
            "max_s": round(max(s for _, s in adds), 4), **{k: round(statistics.median(v), 4) for k, v in parts.items()},
            "tiers_after": len(view.tiers),
        }
        t0 = time.perf_counter()
        lexicon.remove(docs[len(docs) // 2].doc_id)  # a document of the oldest, largest tier
        held.remove(docs[len(docs) // 2])
        lexicon.view(held)
        inv["delete_document_s"] = round(time.perf_counter() - t0, 4)
        lexicon.close()
    row["inverted"] = inv
    row["speedup_median"] = round(row["scan"]["query_ms"]["median"] / max(inv["query_ms"]["median"], 1e-9), 1)
    log(f"  inverted: build {inv['build_s']} s, open {inv['open_s']} s, query {inv['query_ms']}, "
        f"add {inv['add_document']['median_s']} s, delete {inv['delete_document_s']} s; same rankings: {row['same_rankings']}")
    if llm is not None:
        row["index"] = measure_index(llm, docs, args)
        log(f"  index: {row['index']}")
    return row


def growth(rows: list[dict]) -> dict:
    """How each cost grew from the smallest size to the largest (1.0 = flat; the token ratio = linear)."""
    a, b = rows[0], rows[-1]

    def ratio(x: float, y: float) -> float:
        return round(y / x, 2) if x else float("nan")

    return {
        "from_tokens": a["tokens"], "to_tokens": b["tokens"], "tokens": ratio(a["tokens"], b["tokens"]),
        "scan_query_median": ratio(a["scan"]["query_ms"]["median"], b["scan"]["query_ms"]["median"]),
        "inverted_query_median": ratio(a["inverted"]["query_ms"]["median"], b["inverted"]["query_ms"]["median"]),
        "inverted_query_p95": ratio(a["inverted"]["query_ms"]["p95"], b["inverted"]["query_ms"]["p95"]),
        "scan_build": ratio(a["scan"]["build_s"], b["scan"]["build_s"]),
        **({"index_retrieve_median": ratio(a["index"]["retrieve_ms"]["median"], b["index"]["retrieve_ms"]["median"])} if "index" in a and "index" in b else {}),
        "inverted_add_document": ratio(a["inverted"]["add_document"]["median_s"], b["inverted"]["add_document"]["median_s"]),
    }


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    if pyplot is None:
        return
    rows = result["results"]
    x = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(11, 4))
    for key, label, color in (("scan", "BM25 scan (old)", "tab:red"), ("inverted", "inverted lexicon", "tab:blue")):
        ax1.plot(x, [r[key]["query_ms"]["median"] for r in rows], "o-", color=color, label=f"{label}, median")
        ax1.plot(x, [r[key]["query_ms"]["p95"] for r in rows], "o--", color=color, alpha=0.6, label=f"{label}, p95")
    if all("index" in r for r in rows):
        ax1.plot(x, [r["index"]["retrieve_ms"]["median"] for r in rows], "s-", color="tab:green", label="ContextIndex.retrieve, median")
    ax1.axhline(100, color="gray", lw=0.8, ls=":", label="target 100 ms")
    ax1.set(xscale="log", yscale="log", xlabel="corpus tokens", ylabel="ms per query (score + rank)", title="query latency")
    ax1.legend(fontsize=7)
    ax2.plot(x, [r["scan"]["build_s"] for r in rows], "o-", color="tab:red", label="scan: rebuilt after any change")
    ax2.plot(x, [r["inverted"]["add_document"]["median_s"] for r in rows], "o-", color="tab:blue", label="inverted: add one document")
    ax2.plot(x, [r["inverted"]["delete_document_s"] for r in rows], "o--", color="tab:blue", alpha=0.6, label="inverted: delete one document")
    ax2.set(xscale="log", yscale="log", xlabel="corpus tokens", ylabel="seconds", title="cost of a change before the next query")
    ax2.legend(fontsize=7)
    fig.suptitle(f"lexical ranking, {len(QUESTIONS)} questions, chunk {result['config']['chunk_size']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, metavar="TOKENS", help="corpus sizes (default 1000000 10000000; --quick: 20000 60000)")
    ap.add_argument("--model", default=None, help="base model folder or id: its tokenizer cuts the chunks; the index measurement loads it too (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk, as the index's chunk_size (default 1024, the shipped adapter's)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of all questions per size (default 5; --quick 2)")
    ap.add_argument("--updates", type=int, default=None, help="documents added one at a time after the build (default 5; --quick 2)")
    ap.add_argument("--update-tokens", type=int, default=10_000, help="tokens of each added document (about)")
    ap.add_argument("--no-index", dest="index", action="store_false", help="skip the end-to-end ContextIndex.retrieve measurement")
    ap.add_argument("--out", default=None, help="folder for JSON and PNG (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="output name instead of lexicon")
    ap.add_argument("--quick", action="store_true", help="the shipped texts, small sizes: a smoke run of seconds")
    add_data_arg(ap)
    args = ap.parse_args(argv)
    args.sizes = sorted(args.sizes or ([20_000, 60_000] if args.quick else [1_000_000, 10_000_000]))
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.updates = args.updates or (2 if args.quick else 5)
    if args.quick:
        args.update_tokens = min(args.update_tokens, 4 * args.chunk_size)

    def log(msg: str) -> None:
        print(msg, flush=True)

    root, why = data_root(args)
    llm, tokenizer, tok_name = model_of(args)
    t0 = time.perf_counter()
    bases = [Base(p, tokenizer, args.chunk_size) for p in base_files(root)]
    chunk_s = time.perf_counter() - t0
    base_tokens = sum(b.tokens for b in bases)
    log(f"corpus {root} ({why}): {len(bases)} files, {sum(len(b.text) for b in bases):,} characters, {base_tokens:,} tokens "
        f"(chunked in {chunk_s:.1f} s)")
    rows = [measure(bases, n, args, log, llm) for n in args.sizes]
    result = {
        "config": {"chunk_size": args.chunk_size, "sizes": args.sizes, "questions": list(QUESTIONS), "top_k": TOP_K,
                   "repeats": args.repeats, "updates": args.updates, "update_tokens": args.update_tokens, "tokenizer": tok_name,
                   "index": args.index,
                   "corpus": {"folder": str(root), "why": why, "files": len(bases), "characters": sum(len(b.text) for b in bases),
                              "tokens": base_tokens, "chunking_s": round(chunk_s, 1)}},
        "results": rows,
        "growth": growth(rows),
    }
    return finish("lexicon", result, args, plot)


if __name__ == "__main__":
    run(main)
