"""Write the full results table, grouped by benchmark, to docs/results.md from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrites docs/results.md
    python benchmarks/report.py --check    # exits 1 when docs/results.md is not what the JSON gives

Every figure is printed as the JSON holds it, with the command that produced it and the machine it ran on. No row
names a machine-local path: an adapter read from a copy outside the repository is named by the shipped adapter
with the same SHA-256 (or as not shipped, with its SHA-256), and so is the ``--adapter`` argument of its command.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
ADAPTERS = ROOT / "sharedctx" / "adapters"


def _machine(m: dict) -> str:
    where = m.get("cuda") or f"{m.get('cpu_count')}-core CPU ({m.get('processor')}), {m.get('torch_threads')} threads"
    load = f", load {m['load_average_1m']}" if m.get("load_average_1m") is not None else ""
    return f"{where}, torch {m.get('torch')}{load}"


@functools.cache
def _shipped() -> dict[str, str]:
    """SHA-256 of each shipped adapter's weights (as the benchmarks record it: of ``adapter.safetensors``) -> its
    folder, relative to the repository. Read here rather than imported, so the report needs neither torch nor
    sharedctx."""
    return {
        hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.relative_to(ROOT).as_posix()
        for p in sorted(ADAPTERS.glob("*/adapter.safetensors"))
    }


def adapter_where(path: str, sha256: str | None) -> str:
    """The adapter a run read, as a reader of the repository can find it: the shipped adapter with the same
    weights (wherever the run's copy was), the path inside the repository, or "not shipped (sha256 …)";
    never a machine-local path."""
    if sha256 and sha256 in _shipped():
        return _shipped()[sha256]
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    if p.is_relative_to(ROOT):
        return p.relative_to(ROOT).as_posix()
    return f"not shipped (sha256 {sha256[:8]}…)" if sha256 else "not shipped (weights not recorded)"


def _adapter(data: dict) -> str:
    a = data.get("adapter") or {}
    if not a.get("path"):
        return "identity adapter (untrained: the context is not read)"
    return f"adapter {adapter_where(a['path'], a.get('sha256'))}" + ("" if a.get("trained") else " (untrained)")


def _adapters_read(data) -> dict[str, str | None]:
    """Every adapter a result file records (``{"path", "sha256"}`` anywhere in it): path -> SHA-256."""
    found: dict[str, str | None] = {}
    if isinstance(data, dict):
        if isinstance(data.get("path"), str) and "sha256" in data:
            found[data["path"]] = data["sha256"]
        for v in data.values():
            found.update(_adapters_read(v))
    elif isinstance(data, list):
        for v in data:
            found.update(_adapters_read(v))
    return found


def _command(data: dict, command: str | None = None) -> str:
    """The run's command as a reader runs it from the repository root, without machine-local paths: the
    ``--adapter`` folder becomes the shipped adapter with the same weights (``ADAPTER`` when none ships), a path
    inside the repository becomes relative, and any other absolute path is shortened to ``<its name>``."""
    words = (command or data["command"]).split(" ")
    adapters = _adapters_read(data)
    for i, w in enumerate(words):
        if i and words[i - 1] == "--adapter":
            where = adapter_where(w, adapters.get(w))
            words[i] = "ADAPTER" if where.startswith("not shipped") else where
        elif w.startswith("/"):
            p = Path(w)
            words[i] = p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else f"<{p.name}>"
    return f"`python benchmarks/{' '.join(words)}`"


def _k(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ppl_rows(data: dict) -> list[str]:
    cmd, mach = _command(data), _machine(data["machine"])
    rows = []
    for r in data["results"]:
        cells = ", ".join(f"{m} {v['ppl']:.2f}" for m, v in r["modes"].items())
        flag = " (full attention past the trained window)" if r.get("full_past_trained_window") else ""
        src = (data.get("sources") or {}).get(r["file"], {})
        name = f"{r['file']} (Python {src['python']} standard library: {', '.join(src['modules'])})" if src.get("modules") else r["file"]
        ctrl = f"; control: {r['control_file']}" if r.get("control_file") and "control" in r["modes"] else ""
        rows.append(
            f"| PPL of the last {r['score_last']} tokens, {name}, {_k(r['total_length'])} tokens, {r['n_windows']} window{'s' if r['n_windows'] != 1 else ''}; "
            f"{_adapter(data)}{ctrl} | {cells}{flag} | {cmd} | {mach} |"
        )
    return rows


def finding_rows(data: dict) -> list[str]:
    cmd, mach = _command(data), _machine(data["machine"])
    per = data["accuracy_by_system_length"]
    n_trials = len(data["tasks"]) * data["trials_per_task"]
    rows = []
    ran: dict[tuple[str, str], int] = {}
    for t in data["trials"]:
        ran[(t["system"], str(t["length"]))] = ran.get((t["system"], str(t["length"])), 0) + 1
    for system in data["systems"]:
        done = {str(n): per.get(system, {}).get(str(n)) for n in data.get("lengths_done", data["lengths"])}
        cells = " · ".join(
            f"{_k(n)} " + ("not run" if v is None else f"{v:.2f}" + (f" ({ran[(system, n)]} of {n_trials} trials ran)" if ran[(system, n)] < n_trials else ""))
            for n, v in done.items()
        )
        if system in data.get("skipped", {}):
            why = "; ".join(sorted(set(data["skipped"][system].values())))
            cells = f"{cells}; {why}" if per.get(system) else f"not run: {why}"
        note = f"; {_adapter(data)}" if system.startswith("sharedctx_latent") else ""
        policy = (data.get("config") or {}).get("policy")
        if system.startswith("sharedctx") and policy:
            note = f"; policy {policy}{note}"
        rows.append(f"| finding things, {system}: mean score over {n_trials} trials a length ({', '.join(data['tasks'])}){note} | {cells} | {cmd} | {mach} |")
    for system, reason in data.get("not_run", {}).items():
        short = reason if len(reason) <= 160 else reason[:160] + "…"
        rows.append(f"| finding things, {system} | not run: {short} | {cmd} | {mach} |")
    return rows


def efficiency_rows(data: dict) -> list[str]:
    cmd, mach = _command(data), _machine(data["machine"])
    rows = []
    for system, per in data["table"].items():
        cells = " · ".join(
            f"{_k(n)} {v['first_token_s']:.2f} s / {v['peak_memory_mb']:.0f} MB" for n, v in sorted(per.items(), key=lambda x: int(x[0]))
        )
        rows.append(f"| time to first token / peak memory, {system} ({data['max_new_tokens']} new tokens) | {cells} | {cmd} | {mach} |")
    refs = {"sharedctx_store": "sharedctx warm store", "sharedctx_text": "sharedctx text mode (warm index)"}
    for name, per in data.get("ratios", {}).items():
        ref = name.split("_over_")[1].removesuffix("_ttft")
        if ref in refs:
            cells = " · ".join(f"{_k(n)} {v:.1f}x" for n, v in sorted(per.items(), key=lambda x: int(x[0])))
            rows.append(f"| time to first token, {name.split('_over_')[0]} over {refs[ref]} (same run) | {cells} | {cmd} | {mach} |")
    return rows


def ablation_rows(data: dict) -> list[str]:
    cmd, mach = _command(data), _machine(data["machine"])
    rows = [f"| ablation reference: window-only PPL at {_k(data['length'])} ({data['file']}) | {data['window_only_ppl']:.2f} | {cmd} | {mach} |"] if data.get("window_only_ppl") else []
    for r in data["rows"]:
        if "not_run" in r:
            rows.append(f"| ablation {r['group']}: {r['label']} | not run: {r['not_run']} | {cmd} | {mach} |")
            continue
        ppl = f"PPL {r['ppl']:.2f}, " if "ppl" in r else ""
        rows.append(
            f"| ablation {r['group']}: {r['label']}; {_adapter(r)} | {ppl}needles {r['needle_accuracy']:.2f} ({r['needle_trials']} trials) | {cmd} | {mach} |"
        )
    return rows


def core_rows(data: dict) -> list[str]:
    q = data["query_first_token_s"]
    p = data["precompute"]
    n = data["document_tokens"]
    cmd = _command(data)
    mach = _machine(data["machine"])
    return [
        f"| encode every node of a {n}-token document (lower model, {data['config']['injection_layers']} layers) | "
        f"{p['lower_tokens_per_s']:,.0f} lower-model tok/s ({p['seconds']:.1f} s) | {cmd} | {mach} |",
        f"| time to first token, precomputed tree ({data['injected_states']} injected states) | {q['precomputed_tree']:.2f} s | {cmd} | {mach} |",
        f"| time to first token, encoding on the fly | {q['on_the_fly']:.2f} s | {cmd} | {mach} |",
        f"| full-attention prefill of the same {n} tokens (baseline) | {q['full_attention_prefill']:.2f} s "
        f"({data['ratios']['full_attention_over_precomputed']:.1f}x the precomputed query) | {cmd} | {mach} |",
    ]


def index_rows(data: dict) -> list[str]:
    """benchmarks/bench_index.py (the index branch's benchmark): build, cold and warm query of a ContextIndex."""
    rows = []
    for r in data["results"]:
        cmd = _command(data, r.get("command"))
        mach = _machine({**data["machine"], "load_average_1m": r.get("load_average_1m", data["machine"].get("load_average_1m"))})
        full = f"; full-attention prefill {r['full_attention_prefill_s']:.1f} s" if r.get("full_attention_prefill_s") else ""
        rows.append(
            f"| ContextIndex over {_k(r['tokens'])} tokens ({r['chunks']} chunks): build, cold / warm time to first token | "
            f"{r['build_s']:.1f} s; {r['cold_first_token_s']:.2f} s / {r['warm_first_token_s']:.2f} s "
            f"({r['warm_injected_states']} states from {r['warm_chunks_selected']} chunks){full} | {cmd} | {mach} |"
        )
        lz = r.get("lazy_text")
        if lz:
            rows.append(
                f"| text-mode retriever over {_k(r['tokens'])} tokens: `ContextIndex(encode=\"lazy\", policy=\"lexical\")` build vs the eager build; "
                f"time to first token of a text-mode answer ({lz['text_prompt_tokens']} prompt tokens) | {lz['build_s']:.2f} s vs {lz['eager_build_s']:.1f} s "
                f"({lz['build_speedup']:.0f}x, {lz['lower_passes']} lower-model passes); {lz['text_first_token_s']:.2f} s | {cmd} | {mach} |"
            )
        c = r.get("concurrent")
        if c:
            rows.append(
                f"| {c['queries']} different questions at once from {c['queries']} threads over the warm {_k(r['tokens'])}-token index, "
                f"{c['new_tokens']} new tokens each: batched forwards vs one forward per query | "
                f"{c['batched']['wall_s']:.2f} s vs {c['separate']['wall_s']:.2f} s ({c['batched_speedup']:.2f}x; largest batch "
                f"{c['batched']['largest_batch']}; same answers: {'yes' if c['same_answers'] else 'no'}) | {cmd} | {mach} |"
            )
    return rows


def lexicon_rows(data: dict) -> list[str]:
    """benchmarks/bench_lexicon.py: ranking chunks by BM25 as the corpus grows, the old scan against the inverted lexicon."""
    cmd, mach = _command(data), _machine(data["machine"])
    rows = []
    for r in data["results"]:
        s, i = r["scan"], r["inverted"]
        add = i["add_document"]
        index = r.get("index")
        end = (f"; `ContextIndex.retrieve` end to end {index['retrieve_ms']['median']:.1f} / {index['retrieve_ms']['p95']:.1f} ms "
               f"({index['tokens']:,} tokens as the index tokenises them)") if index else ""
        rows.append(
            f"| lexical ranking of {r['chunks']:,} chunks ({r['tokens']:,} tokens, {r['documents']} documents): ms per query "
            f"(score + top {data['config']['top_k']}), median / p95, BM25 scan vs inverted lexicon; cost of a change | "
            f"scan {s['query_ms']['median']:.2f} / {s['query_ms']['p95']:.2f} ms vs inverted {i['query_ms']['median']:.2f} / "
            f"{i['query_ms']['p95']:.2f} ms ({r['speedup_median']:.0f}x; same rankings: {'yes' if r['same_rankings'] else 'NO'}, "
            f"largest score difference {r['max_abs_score_diff']:g}){end}; scan rebuilt after any change {s['build_s']:.2f} s vs "
            f"one document of ~{add['tokens_each'][0]:,} tokens added {add['median_s'] * 1000:.1f} ms, one deleted "
            f"{i['delete_document_s'] * 1000:.1f} ms; lexicon built {i['build_s']:.2f} s, reopened {i['open_s']:.2f} s | {cmd} | {mach} |"
        )
    g = data.get("growth")
    if g and len(data["results"]) > 1:
        idx = f", `retrieve` x{g['index_retrieve_median']}" if "index_retrieve_median" in g else ""
        rows.append(
            f"| growth from {g['from_tokens']:,} to {g['to_tokens']:,} tokens (x{g['tokens']}) | median query: scan x{g['scan_query_median']}, "
            f"inverted x{g['inverted_query_median']} (p95 x{g['inverted_query_p95']}){idx}; add a document: inverted "
            f"x{g['inverted_add_document']}, scan rebuild x{g['scan_build']} | {cmd} | {mach} |"
        )
    return rows


def distributed_rows(data: dict) -> list[str]:
    """benchmarks/bench_distributed.py: one-process index build against Ray Data with CPU actors, same run; a projection."""
    cmd, mach = _command(data), _machine(data["machine"])
    ray, d = data["ray"], data["data"]
    what = f"{d.get('files', '?')} files, {ray['tokens']:,} tokens, {ray['chunks']} chunks"
    rows = [
        f"| index build, one process with {s['threads']} thread(s) ({what}) | {s['build_s']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s | {cmd} | {mach} |"
        for s in data["single"]
    ]
    ratio = ", ".join(f"x{v} vs {k} thread(s)" for k, v in data["ray_over_single_throughput"].items())
    rows.append(
        f"| index build on Ray Data, {ray['actors']} CPU actors of {ray['actor_threads']} thread(s) ({what}) | {ray['build_s']:.1f} s "
        f"({ray['tokens_per_s']:,.0f} tokens/s; throughput {ratio}), plus ray.init {ray['ray_init_s']:.1f} s; start-up "
        f"{ray['startup_s']:.1f} s, encode window {ray['encode_window_s']:.1f} s ({ray['encode_window_tokens_per_s']:,.0f} tokens/s), "
        f"tail {ray['tail_s']:.1f} s; same chunk keys as the one-process build: {'yes' if data['same_chunk_keys'] else 'NO'} | {cmd} | {mach} |"
    )
    pr = data.get("projected")
    if pr:
        pts = ", ".join(f"{r['actors']}: {r['build_s']:.0f} s ({r['tokens_per_s']:,.0f} tokens/s)" for r in pr["rows"])
        rows.append(f"| **projection, not a measurement**: N CPU actors, `{pr['formula']}` from this run's S = {pr['S_serial_s']} s and "
                    f"r = {pr['r_per_actor_chunks_per_s']} chunks/s an actor | {pts} | {cmd} | {mach} |")
    return rows


def selection_rows(data: dict) -> list[str]:
    """benchmarks/bench_selection.py: does the question's score put the answer's chunk on top?"""
    cmd = _command(data)
    mach = _machine(data["machine"])
    rows = []
    for scorer, per in data["summary"].items():
        cells = " · ".join(
            f"{_k(int(n))} {c['recall@1']:.2f} / {c['recall@2']:.2f} / {c['recall@8']:.2f} ({c['trials']} trials)" for n, c in per.items()
        )
        rows.append(f"| chunk selection, `{scorer}`: recall@1 / @2 / @8 of the answer's chunk | {cells} | {cmd} | {mach} |")
    return rows


def rewording_rows(data: dict) -> list[str]:
    """benchmarks/bench_rewording.py: top-1 chunk accuracy of the chunk rankers on reworded questions and finding tasks."""
    cmd, mach = _command(data), _machine(data["machine"])
    arms = data["arms"]

    def cells(acc: dict) -> str:
        return " · ".join(f"{a} {acc[a]['top1']:.2f} (@3 {acc[a]['recall@3']:.2f}, MRR {acc[a]['mrr']:.2f})" for a in arms)

    r = data["reworded"]
    docs = ", ".join(f"{name} ({d['chunks']})" for name, d in r["documents"].items())
    rows = [f"| top-1 chunk accuracy, {r['questions']} reworded questions in one index of {r['chunks']} chunks of "
            f"{_k(data['chunk_size'])} tokens ({docs}; embedder {data['embedder']}) | {cells(r['accuracy'])} | {cmd} | {mach} |"]
    f = data["finding"]
    for n in f["lengths"]:
        acc = {a: f["accuracy"][a][str(n)] for a in arms}
        rows.append(f"| top-1 chunk accuracy, finding tasks at {_k(n)} tokens ({', '.join(f['tasks'])}; "
                    f"{next(iter(acc.values()))['n']} trials) | {cells(acc)} | {cmd} | {mach} |")
    for arm, reason in data.get("not_run", {}).items():
        rows.append(f"| top-1 chunk accuracy, {arm} | not run: {reason[:160]} | {cmd} | {mach} |")
    return rows


def learnability_rows(data: dict) -> list[str]:
    """benchmarks/bench_learnability.py: can the injection path learn a content lookup at all (tiny model, from scratch)?"""
    mach = _machine(data["machine"])
    rows = []
    for name, arm in data["arms"].items():
        kept = ""
        if arm.get("acc_kept") is not None and arm.get("acc_dropped") is not None and arm.get("kept_fraction", 1.0) < 1.0:
            kept = f" (records kept {arm['acc_kept']:.3f} / sampled away {arm['acc_dropped']:.3f})"
        rows.append(
            f"| lookup learnability, `{name}`: {arm['note']}; {arm['steps']} steps, {arm['seconds']:.1f} s | accuracy with the true "
            f"context {arm['acc_true']:.3f}{kept}, unrelated context {arm['acc_unrelated']:.3f}, chance {arm['chance']:.4f} | "
            f"{_command(data, arm['command'])} | {mach} |"
        )
    return rows


#: file-name prefix -> row builder; ``<prefix>*.json`` (e.g. finding_16k.json written with --name) all count
ROWS = {
    "core": core_rows,
    "efficiency": efficiency_rows,
    "index": index_rows,
    "lexicon": lexicon_rows,
    "distributed": distributed_rows,
    "selection": selection_rows,
    "rewording": rewording_rows,
    "finding": finding_rows,
    "ppl": ppl_rows,
    "ablations": ablation_rows,
    "learnability": learnability_rows,
}

#: file-name prefix -> (heading, what the rows measure) on the results page
SECTIONS = {
    "core": (
        "Encoding once, answering many times (`bench_core.py`)",
        ("The lower model encodes every node of every chunk's tree once; a question then selects by lookup. Time to first "
         "token from the precomputed tree, from encoding on the fly, and for full attention over the same tokens."),
    ),
    "efficiency": (
        "Time to first token and memory against length (`bench_efficiency.py`)",
        ("Each system answers the same single-needle question about the same text, greedily. `sharedctx_latent` encodes "
         "on the fly, `sharedctx_store` answers from an index built once and reopened from disk, `sharedctx_text` puts "
         "that index's chosen spans in the prompt; `rag_minilm` and `bm25` retrieve chunks into the prompt, `streaming` "
         "keeps sink and recent tokens, `full` reads everything (run only up to the length its row shows). The ratio "
         "rows divide a baseline's time to first token by sharedctx's, within the same run."),
    ),
    "index": (
        "The index: build, cold and warm queries, concurrency (`bench_index.py`)",
        ("A `ContextIndex` built over one long text: build time, first token of the first (cold) and a later (warm) query, "
         "questions asked at once from several threads, and the lazily encoded text-only build."),
    ),
    "lexicon": (
        "Lexical ranking as the corpus grows (`bench_lexicon.py`)",
        ("The ranking step of `ContextIndex.retrieve` under the `lexical` policy, over corpora built from the shared "
         "books, code and TeX (repeated with varied words past their own size), chunked as the index chunks: the old "
         "BM25 scan of every chunk against the inverted lexicon kept in the index (`sharedctx.index.lexicon`), on 25 "
         "questions; both give the same scores. A change costs the scan a full recount before the next query, the "
         "lexicon the changed document's segment and a rebuild of one tier. See docs/lexicon.md."),
    ),
    "distributed": (
        "Building an index on Ray (`bench_distributed.py`)",
        ("The same files indexed by one process (`ContextIndex.add_many`) and by `sharedctx.distributed.build_index` on a "
         "local Ray cluster of CPU actors, fresh stores, same model, in one run; the Ray build's time split into start-up "
         "(Ray Data workers and actors loading the model), the window in which actors encode, and the merge tail. The "
         "last row projects N actors from this run's serial part and per-actor speed: a projection, labelled as such. "
         "See docs/distributed.md."),
    ),
    "selection": (
        "Chunk selection: does the question's score put the answer's chunk first? (`bench_selection.py`)",
        ("Recall@1 / @2 / @8 of the chunk holding the answer, over the finding tasks. `design` is the paper's key-based "
         "selection (the `query` policy); `mean_l*` and `maxleaf_l*` are untrained hidden-state variants; `lexical` is "
         "the library's `lexical` policy; `bm25` is bm25s over the same texts, an outside reference."),
    ),
    "rewording": (
        "Chunk ranking on reworded questions: lexical, hybrid, MiniLM (`bench_rewording.py`)",
        ("Which chunk does the first step of `ContextIndex.retrieve` rank first? Top-1 accuracy (a gold chunk first), "
         "recall@3 and mean reciprocal rank, on questions written in other words than their passage "
         "(benchmarks/data/rewording.json, all documents in one index) and on the finding tasks (one index per trial). "
         "`lexical_unstemmed`: BM25 over surface words (the tokenizer before stemming); `lexical`: the `lexical` policy "
         "(BM25 over Snowball stems); `minilm`: all-MiniLM-L6-v2 alone (a chunk's best 128-token piece); `hybrid`: "
         "`ContextIndex(embedder=...)`, reciprocal rank fusion of `lexical` and `minilm`."),
    ),
    "finding": (
        "Finding things: passkeys, RULER-style needles, variable tracking (`bench_finding.py`)",
        ("Mean exact or contained-match score over the trials of each length. `sharedctx_latent` reads injected states; "
         "`sharedctx_text` is the index as a retriever (the walk's chosen spans in the prompt); the other systems use the "
         "same base model. A system that could not run says why."),
    ),
    "ppl": (
        "Perplexity: does the adapter read its context? (`bench_ppl.py`)",
        ("Perplexity of the last 256 tokens of a window after the context. `adapter`: the context injected; `control`: an "
         "unrelated text of the same kind injected; `window`: no context; `full`: full attention over context and window; "
         "`streaming`: sink and recent tokens. Reading shows as adapter below control; adaptation to the genre as both "
         "below window."),
    ),
    "ablations": (
        "Ablations (`bench_ablations.py`)",
        ("One option changed at a time from the adapter's configuration, on perplexity and needles. An option that "
         "changes the adapter's shape (`injection_layers`) runs with the identity adapter."),
    ),
    "learnability": (
        "Can the injection path learn to read? (`bench_learnability.py`)",
        ("A tiny random LLaMA (4 layers, hidden 64) trained from scratch on a synthetic lookup: the context holds fresh "
         "random key -> value records, the window asks keys. Accuracy on 256 fresh examples with the true context, with "
         "an unrelated context of the same distribution, and chance. Arms change one thing: chunk positions, injected "
         "layers, compression, which lower layer feeds which upper layer, a frozen base; two controls break the "
         "mechanism on purpose (gates held at zero, keys shuffled against values)."),
    ),
}

HEADER = ["| what | measured | command | machine |", "| --- | --- | --- | --- |"]


def rows_by_benchmark(results: Path = RESULTS, suffix: str = "") -> dict[str, list[str]]:
    """``{prefix: table rows}`` from ``results/<prefix>*.json`` (``suffix="_quick"`` reads the quick runs instead)."""
    out: dict[str, list[str]] = {}
    for prefix, fn in ROWS.items():
        for path in sorted(Path(results).glob(f"{prefix}*.json")):
            if path.stem.endswith("_quick") != (suffix == "_quick"):
                continue
            out.setdefault(prefix, []).extend(fn(json.loads(path.read_text())))
    return out


def table(results: Path = RESULTS, suffix: str = "") -> str:
    """All rows as one table (``suffix="_quick"`` reads the quick runs instead)."""
    rows = [r for rs in rows_by_benchmark(results, suffix).values() for r in rs]
    return "\n".join(HEADER + (rows or ["| (no results yet) | | | |"]))


def page(results: Path = RESULTS) -> str:
    """docs/results.md: every row, one section per benchmark."""
    parts = [
        "# Results",
        "",
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.json: edit those, not this page. -->",
        "",
        (
            "Every figure below is the output of the command beside it (run from the repository root), on the machine "
            "named there, copied as the JSON in `benchmarks/results/` holds it. A CPU shared with other jobs records its "
            "load average: compare timings within one run. Where a run read an adapter from a copy outside the "
            "repository, its row and command name the shipped adapter with the same SHA-256 of its weights. "
            "[benchmarks/README.md](../benchmarks/README.md) describes each protocol and baseline."
        ),
    ]
    for prefix, rows in rows_by_benchmark(results).items():
        heading, about = SECTIONS[prefix]
        parts += ["", f"## {heading}", "", about, "", *HEADER, *rows]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/results.md is out of date; write nothing")
    args = parser.parse_args(argv)
    text = page()
    n_rows = sum(len(rows) for rows in rows_by_benchmark().values())
    if args.check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run `python benchmarks/report.py`", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}: {n_rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
