"""One GPU session for the default model: train its adapter with a recipe, then measure it, all under ``--out``.

Written for the H200 that some sessions are lent for 15 minutes (the two-run procedure is in
``recipes/device/README.md``), and runnable anywhere else: on the CPU with ``--device cpu`` and a few steps it checks
the whole path before device time is spent (``tests/test_device_session.py`` runs it on a tiny model).

    python recipes/device/gpu_session.py --recipe recipes/smollm2-gpu.toml --gguf /tmp/sc/model.gguf \\
        --data /tmp/sc/shards --heldout /tmp/sc/heldout --out $OUT --train-seconds 400

What it writes under ``--out``: ``adapter/`` (the adapter, ready for ``sharedctx/adapters/``), ``train_log.jsonl``,
``session.json`` (training summary, perplexity with controls, passkey accuracy, timings, machine) and a copy of the
recipe as run. Every stage has a deadline so the session ends inside the lent time, with what it measured so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sharedctx import SharedCtxConfig, SharedLLM  # noqa: E402
from sharedctx.training.data import DEFAULT_HOLDOUT, read_eval_text  # noqa: E402
from sharedctx.training.evaluate import eval_passkey, eval_ppl, machine  # noqa: E402
from sharedctx.training.trainer import Trainer, load_recipe  # noqa: E402


def load_model(args) -> tuple[torch.nn.Module, object]:
    """The base model: from a GGUF file (the GPU machine), a folder, or the default model; float32 weights
    (training runs under bf16 autocast on CUDA, and the adapter's copies of q/o_proj stay float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.gguf:
        gguf = Path(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        from sharedctx.base_model import load_base_model

        model, tok = load_base_model(args.model)
    return model.to(args.device).eval(), tok


def eval_tokens(tok, name: str, folder: Path) -> tuple[np.ndarray, dict]:
    """Token ids of a held-out text (under ``folder`` as in ../shared/data, or flat there) or a stdlib text."""
    try:
        text, info = read_eval_text(name, folder)
    except FileNotFoundError:
        text, info = read_eval_text(Path(name).name, folder)  # staged flat
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64), info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--gguf", default=None, help="model.gguf of the base model (else --model or the default model)")
    ap.add_argument("--model", default=None, help="a local model folder (default: the default model)")
    ap.add_argument("--data", required=True, help="token shards (sharedctx.data.build_shards output)")
    ap.add_argument("--heldout", required=True, help="folder holding the held-out text files (as in ../shared/data, or flat)")
    ap.add_argument("--heldout-files", nargs="+", default=list(DEFAULT_HOLDOUT))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps (the schedule's length)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size (a CPU dry run)")
    ap.add_argument("--train-seconds", type=float, default=400.0, help="stop training after this long (keeps the adapter)")
    ap.add_argument("--ppl-lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--ppl-window", type=int, default=4096)
    ap.add_argument("--ppl-windows", type=int, default=4, help="stretches per file and length")
    ap.add_argument("--score-last", type=int, default=256, help="perplexity of the window's last tokens")
    ap.add_argument("--long-files", nargs="+", default=["books/pride_and_prejudice.txt", "math/pari_usersch3.tex", "stdlib:code"],
                    help="held-out texts long enough for --long-lengths (stdlib:code: see sharedctx.data.STDLIB_TEXTS)")
    ap.add_argument("--long-lengths", type=int, nargs="*", default=[65536, 131072], help="one stretch per file and length")
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--passkey-trials", type=int, default=10)
    ap.add_argument("--passkey-policies", nargs="+", default=["trained", "lexical"], help="'trained' = the recipe's policy")
    ap.add_argument("--eval-seconds", type=float, default=150.0, help="skip the evaluations left after this long")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    session: dict = {"argv": sys.argv[1:] if argv is None else list(argv), "machine": machine(), "timings": timings}

    def dump() -> None:
        (out / "session.json").write_text(json.dumps(session, indent=1, default=str) + "\n")

    t = time.perf_counter()
    model, tok = load_model(args)
    timings["load_s"] = round(time.perf_counter() - t, 1)

    overrides = {"device": args.device, "max_time_s": args.train_seconds, "data": args.data, "out_dir": str(out / "run"), "progress": False}
    if args.steps:
        overrides["steps"] = args.steps
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = load_recipe(args.recipe, **overrides)
    llm = SharedLLM.from_model(model, tok, config=SharedCtxConfig.from_dict(cfg.sharedctx))
    session["recipe"] = cfg.to_dict()
    shutil.copy(args.recipe, out / f"recipe_as_run{Path(args.recipe).suffix}")

    t = time.perf_counter()
    trainer = Trainer(cfg, llm=llm)  # the shards in --data (refused if they train on a file the recipe holds out)
    summary = trainer.fit()
    timings["train_s"] = round(time.perf_counter() - t, 1)
    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(summary["adapter"], adapter_dir)
    shutil.copy(Path(cfg.out_dir) / "train_log.jsonl", out / "train_log.jsonl")
    session["training"] = summary
    dump()

    llm.eval()
    eval_deadline = time.perf_counter() + args.eval_seconds
    texts, sources, ppl, skipped = {}, {}, [], []
    for name in dict.fromkeys(args.heldout_files + (args.long_files if args.long_lengths else [])):
        try:
            texts[name], sources[name] = eval_tokens(tok, name, Path(args.heldout))
        except OSError as exc:  # e.g. a standard-library module this Python lacks: measure the rest
            skipped.append({"eval": "ppl", "file": name, "reason": f"unreadable: {exc}"})
    session["sources"] = sources
    t = time.perf_counter()
    for files, lengths, windows in ((args.heldout_files, args.ppl_lengths, args.ppl_windows), (args.long_files, args.long_lengths, 1)):
        files = [f for f in files if f in texts]
        for i, name in enumerate(files):
            control = files[(i + 1) % len(files)]  # the same adapter reading another held-out text (the control)
            for n in lengths:
                if time.perf_counter() > eval_deadline:
                    skipped.append({"eval": "ppl", "file": name, "length": n, "reason": "--eval-seconds spent"})
                    continue
                if not name.startswith("stdlib:") and name not in cfg.holdout:
                    skipped.append({"eval": "ppl", "file": name, "length": n, "reason": "the recipe trains on it (not in its holdout)"})
                    continue
                if len(texts[name]) < n or len(texts[control]) < n - args.ppl_window:
                    skipped.append({"eval": "ppl", "file": name, "length": n, "reason": f"{name} or its control {control} is too short"})
                    continue
                r = eval_ppl(llm, texts[name], total_length=n, window=args.ppl_window, score_last=args.score_last, n_windows=windows,
                             modes=("adapter", "control", "window"), control_tokens=texts[control])
                r.update(file=name, control_file=control)
                ppl.append(r)
                print(f"{name} N={n}: " + "  ".join(f"{m} {v['ppl']:.3f}" for m, v in r["modes"].items()), flush=True)
    timings["ppl_s"] = round(time.perf_counter() - t, 1)
    session["ppl"], session["skipped"] = ppl, skipped
    dump()

    t = time.perf_counter()
    passkey = {}
    trained_policy = llm.config.policy
    for policy in args.passkey_policies:
        if time.perf_counter() > eval_deadline:
            skipped.append({"eval": "passkey", "policy": policy, "reason": "--eval-seconds spent"})
            continue
        llm.config = llm.config.replace(policy=trained_policy if policy == "trained" else policy)
        r = eval_passkey(llm, lengths=args.passkey_lengths, trials=args.passkey_trials, modes=("adapter",))
        passkey[llm.config.policy] = r
        print(f"passkey, policy {llm.config.policy}: " + "  ".join(f"{n}: {v['accuracy']:.2f}" for n, v in r["modes"]["adapter"].items()), flush=True)
    llm.config = llm.config.replace(policy=trained_policy)
    timings["passkey_s"] = round(time.perf_counter() - t, 1)
    session["passkey"] = passkey
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    dump()
    return session


if __name__ == "__main__":
    main()
