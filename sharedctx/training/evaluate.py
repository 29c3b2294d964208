"""Evaluation: the paper's perplexity protocol and passkey retrieval, as functions and as `sharedctx eval`
(``sharedctx eval reading`` runs the reading diagnostics of `sharedctx.training.reading`).

Perplexity (`eval_ppl`): a stretch of ``total_length`` tokens is cut into a context (all but the last ``window``
tokens) and a window; the score is the perplexity of the window's last ``score_last`` tokens, pooled over
``n_windows`` stretches spread evenly over the file. Modes:

- ``adapter``: the context goes into the tree and is injected (the method);
- ``control``: the same, but the context is an unrelated text of the same length (another file), which
  separates reading the context from adapting to the kind of text;
- ``window``: the window alone (no context);
- ``full``: plain full attention over all ``total_length`` tokens (past the base model's window too);
- ``streaming``: attention sinks (the stretch's first ``sinks`` tokens) + the window.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..injection import injection_disabled
from .data import passkey_example
from .windows import scored_nll, window_nll, window_starts

__all__ = ["eval_ppl", "eval_passkey", "window_starts", "add_eval_parser", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("adapter", "control", "window", "full", "streaming")


def _base_nll(llm: Any, ids: torch.Tensor, score_last: int) -> float:
    """NLL of the last ``score_last`` tokens of ``ids`` under the plain base model (no length check)."""
    with injection_disabled():
        out = llm.base(input_ids=ids[None].to(llm.device), use_cache=False, logits_to_keep=score_last + 1)
    return scored_nll(out.logits[0, :-1], ids[-score_last:])


@torch.no_grad()
def eval_ppl(
    llm: Any,
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    total_length: int,
    window: int = 4096,
    score_last: int = 256,
    n_windows: int = 4,
    modes: Sequence[str] = ("adapter", "control", "window"),
    control_tokens: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    sinks: int = 4,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of the last ``score_last`` tokens of a ``window`` after ``total_length - window`` context tokens.

    Returns ``{"modes": {mode: {"ppl", "nll", "tokens", "per_window"}}, "starts": [...], ...}``; ``ppl`` pools
    the NLL of all scored tokens of all windows. ``control_tokens`` (another text) is needed for ``control``.
    """
    from tqdm.auto import tqdm

    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    if not 0 < score_last < window <= total_length:
        raise ValueError(f"need 0 < score_last ({score_last}) < window ({window}) <= total_length ({total_length})")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    n_ctx = total_length - window
    starts = window_starts(tokens.numel(), total_length, n_windows)
    control_starts: list[int] = []
    if "control" in modes:
        if control_tokens is None:
            raise ValueError("the control mode needs an unrelated text: pass control_tokens (--control-file)")
        control_tokens = torch.as_tensor(np.asarray(control_tokens, dtype=np.int64))
        control_starts = window_starts(control_tokens.numel(), max(n_ctx, 1), n_windows)
    llm.eval()
    sums = {m: [] for m in modes}
    seconds = {m: 0.0 for m in modes}
    with tqdm(total=len(starts) * len(modes), disable=not show_progress, desc=f"ppl {total_length}") as bar:
        for i, s in enumerate(starts):
            stretch = tokens[s : s + total_length]
            ctx, win = stretch[:n_ctx], stretch[n_ctx:]
            for mode in modes:
                t0 = time.perf_counter()
                if mode == "adapter":
                    nll = window_nll(llm, win, score_last, context=ctx if n_ctx else None)
                elif mode == "control":
                    cs = control_starts[i]
                    nll = window_nll(llm, win, score_last, context=control_tokens[cs : cs + n_ctx] if n_ctx else None)
                elif mode == "window":
                    nll = window_nll(llm, win, score_last)
                elif mode == "full":
                    nll = _base_nll(llm, stretch, score_last)
                else:  # streaming
                    nll = _base_nll(llm, torch.cat([stretch[: min(sinks, n_ctx)], win]), score_last)
                seconds[mode] += time.perf_counter() - t0
                sums[mode].append(nll)
                bar.update(1)
    result: dict[str, Any] = {"modes": {}}
    for mode in modes:
        total = sum(sums[mode])
        n = score_last * len(starts)
        result["modes"][mode] = {
            "ppl": math.exp(total / n),
            "nll": total / n,
            "tokens": n,
            "per_window_ppl": [math.exp(v / score_last) for v in sums[mode]],
            "seconds": round(seconds[mode], 2),
        }
    m = result["modes"]
    for ref in ("window", "control"):
        if "adapter" in m and ref in m:
            result[f"adapter_vs_{ref}_pct"] = 100.0 * (m["adapter"]["ppl"] / m[ref]["ppl"] - 1.0)
    result.update(
        {"total_length": total_length, "window": window, "score_last": score_last, "context_tokens": n_ctx, "n_windows": len(starts), "starts": starts, "control_starts": control_starts}
    )
    return result


@torch.no_grad()
def eval_passkey(
    llm: Any,
    *,
    lengths: Sequence[int],
    trials: int = 6,
    depths: Sequence[float] | None = None,
    modes: Sequence[str] = ("adapter",),
    seed: int = 0,
    filler: np.ndarray | None = None,
    max_new_tokens: int = 32,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Passkey retrieval accuracy by length and depth.

    ``adapter``: the haystack is the context (tree) and the question the prompt; ``full``: haystack and question
    together in the prompt, plain full attention (lengths past the base model's window are skipped). Trials at
    each length cycle through ``depths`` (evenly spaced from 0 to 1 by default). A trial is correct when the
    answer contains the key.
    """
    from tqdm.auto import tqdm

    depths = list(depths) if depths else [i / max(1, trials - 1) for i in range(trials)]
    tok = llm.tokenizer
    llm.eval()
    out: dict[str, Any] = {"lengths": list(lengths), "trials": trials, "depths": depths, "modes": {}}
    for mode in modes:
        if mode not in ("adapter", "full"):
            raise ValueError(f"passkey modes are 'adapter' and 'full', got {mode!r}")
        per_len: dict[str, Any] = {}
        for length in lengths:
            rng = np.random.default_rng(seed + length)
            if mode == "full" and llm.max_positions and length + 64 > llm.max_positions:
                per_len[str(length)] = {"skipped": f"longer than the base model's {llm.max_positions}-token window"}
                continue
            rows = []
            for t in tqdm(range(trials), disable=not show_progress, desc=f"passkey {mode} {length}"):
                ex = passkey_example(tok, rng, length=length, filler=filler, depth=depths[t % len(depths)])
                question = "What is the pass key hidden in the text? Answer with the number only."
                if mode == "adapter":
                    answer = llm.generate(question, context=ex.context, max_new_tokens=max_new_tokens)
                else:
                    text = tok.decode(ex.context.tolist())
                    answer = llm.generate(text + "\n\n" + question, max_new_tokens=max_new_tokens)
                rows.append({"depth": ex.meta["depth"], "key": ex.meta["key"], "answer": answer, "correct": ex.meta["key"] in answer})
            by_depth: dict[str, list[bool]] = {}
            for r in rows:
                by_depth.setdefault(f"{r['depth']:.2f}", []).append(r["correct"])
            per_len[str(length)] = {
                "accuracy": sum(r["correct"] for r in rows) / len(rows),
                "by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()},
                "trials": rows,
            }
        out["modes"][mode] = per_len
    return out


# ---------------------------------------------------------------------- CLI
def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _adapter_info(llm: Any) -> dict[str, Any]:
    return {"path": llm.adapter_path, "trained": llm.adapter_trained, "config": llm.config.to_dict()}


def _cmd_ppl(args) -> int:
    from ..index.documents import read_document

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.control and "control" not in modes:
        modes.insert(1 if "adapter" in modes else 0, "control")
    llm = args.load_model(args)
    tok = llm.tokenizer

    def ids(path):
        return np.asarray(tok(read_document(path), add_special_tokens=False)["input_ids"], dtype=np.int64)

    files = list(args.file)
    texts = {f: ids(f) for f in files}
    controls = list(args.control_file or [])
    results = []
    for i, f in enumerate(files):
        control = controls[i % len(controls)] if controls else (files[(i + 1) % len(files)] if len(files) > 1 else None)
        if "control" in modes and (control is None or control == f):
            raise ValueError("the control mode needs an unrelated text: give --control-file PATH or several --file")
        ctrl_ids = (texts[control] if control in texts else ids(control)) if "control" in modes else None
        for n in args.total_length:
            t0 = time.perf_counter()
            r = eval_ppl(
                llm, texts[f], total_length=n, window=args.window, score_last=args.score_last, n_windows=args.windows,
                modes=modes, control_tokens=ctrl_ids, sinks=args.sinks, show_progress=not args.json,
            )
            r.update({"file": f, "control_file": control if "control" in modes else None, "seconds": round(time.perf_counter() - t0, 1)})
            results.append(r)
            if not args.json:
                cells = "  ".join(f"{m} {r['modes'][m]['ppl']:.3f}" for m in modes)
                gains = "  ".join(f"vs {k.split('_')[2]} {r[k]:+.1f}%" for k in r if k.startswith("adapter_vs_"))
                print(f"{f}  N={n}  {cells}  {gains}", flush=True)
    payload = {"task": "ppl", "results": results, "adapter": _adapter_info(llm), "machine": machine()}
    _emit(payload, args)
    return 0


def _cmd_passkey(args) -> int:
    from ..index.documents import read_document

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = args.load_model(args)
    filler = None
    if args.filler_file:
        filler = np.asarray(llm.tokenizer(read_document(args.filler_file), add_special_tokens=False)["input_ids"], dtype=np.int64)
    depths = [float(d) for d in args.depths.split(",")] if args.depths else None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    r = eval_passkey(llm, lengths=args.length, trials=args.trials, depths=depths, modes=modes, seed=args.seed, filler=filler, max_new_tokens=args.max_new_tokens, show_progress=not args.json)
    if not args.json:
        for mode, per in r["modes"].items():
            for n, v in per.items():
                print(f"passkey {mode} N={n}: " + (v["skipped"] if "skipped" in v else f"{v['accuracy']:.2f}  by depth {v['by_depth']}"))
    payload = {"task": "passkey", **r, "filler": args.filler_file or "synthetic", "adapter": _adapter_info(llm), "machine": machine()}
    _emit(payload, args)
    return 0


def _cmd_reading(args) -> int:
    from ..index.documents import read_document
    from .objectives import MARKER, marker_ids
    from .reading import eval_reading

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = args.load_model(args)
    tok = llm.tokenizer

    def ids(path):
        return np.asarray(tok(read_document(path), add_special_tokens=False)["input_ids"], dtype=np.int64)

    files = list(args.file)
    controls = list(args.control_file or [])
    context_tokens = args.context_chunks * llm.config.chunk_size
    results = []
    for i, f in enumerate(files):
        control = controls[i % len(controls)] if controls else (files[(i + 1) % len(files)] if len(files) > 1 else None)
        if control is None or control == f:
            raise ValueError("the reading diagnostics need an unrelated text of the same genre: give --control-file PATH or several --file")
        t0 = time.perf_counter()
        r = eval_reading(
            llm, ids(f), ids(control), context_tokens=context_tokens, window=args.window, n_windows=args.windows, span=args.span,
            score_last=args.score_last, marker=marker_ids(tok, args.marker or MARKER), seed=args.seed, show_progress=not args.json,
        )
        r.update({"file": f, "control_file": control, "seconds": round(time.perf_counter() - t0, 1)})
        results.append(r)
        if not args.json:
            levels = "  ".join(f"L{lv} {g:+.2f}%" for lv, g in r["copy_gain_by_level_pct"].items())
            print(
                f"{f}  ctx={context_tokens}  ppl true {r['ppl']['true']:.3f} control {r['ppl']['control']:.3f} window {r['ppl']['window']:.3f}  "
                f"reading {r['reading_gain_pct']:+.2f}%  adaptation {r['adaptation_pct']:+.2f}%  copy {r['copy_gain_pct']:+.2f}% ({levels})",
                flush=True,
            )
    _emit({"task": "reading", "results": results, "adapter": _adapter_info(llm), "machine": machine()}, args)
    return 0


def _emit(payload: dict[str, Any], args) -> None:
    text = json.dumps(payload, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        print(text)


def add_eval_parser(sub: Any, add_model_args, load_model) -> None:
    """Register ``sharedctx eval ppl``, ``sharedctx eval passkey`` and ``sharedctx eval reading``; ``add_model_args(parser)`` adds the model
    options and ``load_model(args)`` builds the `SharedLLM` from them (both from the CLI)."""
    ev = sub.add_parser("eval", help="measure perplexity with and without context, reading and copy gains, or passkey retrieval")
    evsub = ev.add_subparsers(dest="eval_command", required=True)

    ppl = evsub.add_parser("ppl", help="perplexity of a window's last tokens after context chunks (the paper's protocol)")
    ppl.add_argument("--file", action="append", required=True, metavar="PATH", help="text to score (repeatable)")
    ppl.add_argument("--total-length", type=int, action="append", required=True, metavar="N", help="context + window tokens (repeatable)")
    ppl.add_argument("--window", type=int, default=4096, help="decoder window (default 4096)")
    ppl.add_argument("--score-last", type=int, default=256, help="score the window's last tokens (default 256)")
    ppl.add_argument("--windows", type=int, default=4, help="stretches per file, spread evenly (default 4)")
    ppl.add_argument("--modes", default="adapter,window", help=f"comma-separated, from {','.join(MODES)} (default adapter,window)")
    ppl.add_argument("--control", action="store_true", help="add the control mode: the adapter reading an unrelated text of the same length")
    ppl.add_argument("--control-file", action="append", default=None, metavar="PATH", help="unrelated text for the control (default: the next --file)")
    ppl.add_argument("--sinks", type=int, default=4, help="attention sinks for the streaming mode")
    _common(ppl, add_model_args)
    ppl.set_defaults(func=_cmd_ppl, load_model=load_model)

    pk = evsub.add_parser("passkey", help="passkey retrieval accuracy by length and depth")
    pk.add_argument("--length", type=int, action="append", required=True, metavar="N", help="haystack tokens (repeatable)")
    pk.add_argument("--trials", type=int, default=6)
    pk.add_argument("--depths", default=None, help="comma-separated depths in [0, 1] (default: evenly spaced)")
    pk.add_argument("--modes", default="adapter", help="adapter and/or full")
    pk.add_argument("--filler-file", default=None, help="haystack text (default: the classic repeated filler)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    _common(pk, add_model_args)
    pk.set_defaults(func=_cmd_passkey, load_model=load_model)

    rd = evsub.add_parser("reading", help="reading gain (true vs unrelated context) and copy gain by tree level (docs/training.md)")
    rd.add_argument("--file", action="append", required=True, metavar="PATH", help="held-out text (repeatable)")
    rd.add_argument("--control-file", action="append", default=None, metavar="PATH", help="unrelated text of the same genre (default: the next --file)")
    rd.add_argument("--context-chunks", type=int, default=2, help="context chunks of the adapter's chunk_size (default 2)")
    rd.add_argument("--window", type=int, default=256, help="decoder window after the context (default 256)")
    rd.add_argument("--score-last", type=int, default=None, help="score the window's last tokens (default: all but the first)")
    rd.add_argument("--windows", type=int, default=4, help="stretches per file, spread evenly (default 4)")
    rd.add_argument("--span", type=int, default=64, help="tokens of each repeated context span (default 64)")
    rd.add_argument("--marker", default=None, help="text before the repeated span (default: a newline, 'Repeat:', a newline)")
    rd.add_argument("--seed", type=int, default=0, help="which nodes and offsets the spans are drawn from")
    _common(rd, add_model_args)
    rd.set_defaults(func=_cmd_reading, load_model=load_model)


def _common(p: argparse.ArgumentParser, add_model_args) -> None:
    add_model_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON to FILE")
