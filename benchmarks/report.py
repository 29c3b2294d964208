"""Regenerate the README's results table from benchmarks/results/*.json.

    python benchmarks/report.py          # rewrites the block between the results markers in README.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from _common import adapter_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _machine(m: dict) -> str:
    where = m.get("cuda") or f"{m.get('cpu_count')}-core CPU ({m.get('processor')}), {m.get('torch_threads')} threads"
    load = f", load {m['load_average_1m']}" if m.get("load_average_1m") is not None else ""
    return f"{where}, torch {m.get('torch')}{load}"


def _adapter(data: dict) -> str:
    a = data.get("adapter") or {}
    if not a.get("path"):
        return "identity adapter (untrained: the context is not read)"
    path = Path(a["path"])
    shipped = {adapter_sha256(p.parent): p.parent for p in (ROOT / "sharedctx" / "adapters").glob("*/adapter.safetensors")}
    if path.is_relative_to(ROOT):
        where = str(path.relative_to(ROOT))
    elif a.get("sha256") in shipped:
        where = f"{shipped[a['sha256']].relative_to(ROOT)} (the same weights, copied to {path})"
    else:
        where = f"{path.name} (not shipped: {path})"
    return f"adapter {where}" + ("" if a.get("trained") else " (untrained)")


def _k(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ppl_rows(data: dict) -> list[str]:
    cmd, mach = f"`python benchmarks/{data['command']}`", _machine(data["machine"])
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
    cmd, mach = f"`python benchmarks/{data['command']}`", _machine(data["machine"])
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
    cmd, mach = f"`python benchmarks/{data['command']}`", _machine(data["machine"])
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
    cmd, mach = f"`python benchmarks/{data['command']}`", _machine(data["machine"])
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
    cmd = f"`python benchmarks/{data['command']}`"
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
        cmd = f"`python benchmarks/{r.get('command', data['command'])}`"
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


def selection_rows(data: dict) -> list[str]:
    """benchmarks/bench_selection.py: does the question's score put the answer's chunk on top?"""
    cmd = f"`python benchmarks/{data['command']}`"
    mach = _machine(data["machine"])
    rows = []
    for scorer, per in data["summary"].items():
        cells = " · ".join(
            f"{_k(int(n))} {c['recall@1']:.2f} / {c['recall@2']:.2f} / {c['recall@8']:.2f} ({c['trials']} trials)" for n, c in per.items()
        )
        rows.append(f"| chunk selection, `{scorer}`: recall@1 / @2 / @8 of the answer's chunk | {cells} | {cmd} | {mach} |")
    return rows


#: file-name prefix -> row builder; ``<prefix>*.json`` (e.g. finding_16k.json written with --name) all count
ROWS = {
    "core": core_rows,
    "ppl": ppl_rows,
    "finding": finding_rows,
    "efficiency": efficiency_rows,
    "ablations": ablation_rows,
    "index": index_rows,
    "selection": selection_rows,
}


def table(results: Path = RESULTS, suffix: str = "") -> str:
    """The results table from ``results/*.json`` (``suffix="_quick"`` reads the quick runs instead)."""
    lines = ["| what | measured | command | machine |", "| --- | --- | --- | --- |"]
    found = False
    for prefix, fn in ROWS.items():
        for path in sorted(Path(results).glob(f"{prefix}*.json")):
            if path.stem.endswith("_quick") != (suffix == "_quick"):
                continue
            lines += fn(json.loads(path.read_text()))
            found = True
    if not found:
        lines.append("| (no results yet) | | | |")
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table()}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new)
    print(block)


if __name__ == "__main__":
    main()
