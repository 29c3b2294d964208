"""Can the injection path learn a content lookup at all? (issue 18, the learnability test)

    python benchmarks/bench_learnability.py                 # every arm, about 10 minutes on one thread
    python benchmarks/bench_learnability.py --arms default reference --steps 300
    python benchmarks/bench_learnability.py --quick         # a smoke run of a few seconds

A tiny random LLaMA (4 layers, width 64) is trained from scratch on `sharedctx.training.lookup`: fresh random
key -> value records in the context, keys asked in the window. Every arm reports steps, seconds, final loss and the
exact-match accuracy of the value tokens with the true context and with an unrelated one (chance = 1 / n_values).

Arms on one-token records (``fused``: a one-hop lookup): ``default`` (chunk positions, the bottom 2 layers injected,
tree height 1 at full resolution), ``positions_none``, ``one_layer``, ``reference`` (plain cross-attention over every
state of the whole context from one lower pass: no tree, no sampling, no chunk positions), ``compressed`` (16-token
chunks, tree height 3, 2 states a node: half the records' states kept), ``deeper_slot`` (the first layer's gate held
at zero: the model must read lower layer 1's states at upper layer 1), ``adapter_only`` and ``adapter_only_lora``
(the random base frozen, as SharedLLM leaves it), and two controls that must stay at chance: ``broken_gates`` (every
gate held at zero) and ``broken_keys`` (injected keys shuffled against their values).
Arms on two-token records (``pairs``: the lower layers must bind each value to its key first): ``pairs_default``,
``pairs_reference`` and ``pairs_in_context`` (no injection: the base model reads ``[context ; window]`` with full
attention, the ceiling of what this tiny model learns in the same budget).

Writes benchmarks/results/learnability.json and learnability.png (accuracy against step, one line per arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from _common import RESULTS, finish, output_name, plt

from sharedctx.config import SharedCtxConfig
from sharedctx.model import SharedLLM
from sharedctx.training.lookup import (
    LookupTask,
    LookupTrainConfig,
    base_model,
    lookup_model,
    shuffled_keys,
    train_in_context,
    train_lookup,
)

FUSED = LookupTask()  # 16 keys x 16 values, 1-4 chunks of 4 one-token records, 4 questions a window
FUSED_LONG = LookupTask(n_keys=32, n_values=16, chunk_size=16, chunks=(1, 2))
PAIRS = LookupTask(n_keys=32, n_values=16, chunk_size=16, chunks=(1, 2), format="pairs")
BASE_CFG = {"injection_layers": 2, "chunk_size": 4, "tree_height": 1, "node_keep": 2, "policy": "right"}


def arms(steps: int, pair_steps: int) -> dict[str, dict]:
    """Each arm: task, SharedCtxConfig fields, LookupTrainConfig fields, what it tests."""
    cfg = BASE_CFG
    pairs_cfg = {"injection_layers": 2, "chunk_size": 16, "tree_height": 1, "node_keep": 8, "policy": "right"}
    return {
        "default": {"task": FUSED, "cfg": cfg, "train": {"steps": steps}, "note": "chunk positions, 2 injected layers, full resolution"},
        "positions_none": {"task": FUSED, "cfg": {**cfg, "positions": "none"}, "train": {"steps": steps}, "note": "no chunk positions"},
        "one_layer": {"task": FUSED, "cfg": {**cfg, "injection_layers": 1}, "train": {"steps": steps}, "note": "injection_layers=1"},
        "reference": {"task": FUSED, "cfg": cfg, "train": {"steps": steps, "path": "reference"},
                          "note": "plain cross-attention over all un-sampled states of one lower pass (no tree, no chunk positions)"},
        "long_full": {"task": FUSED_LONG, "cfg": {**cfg, "chunk_size": 16, "node_keep": 8}, "train": {"steps": 3 * steps},
                          "note": "16 records a chunk, 1-2 chunks, 32 keys; tree height 1, full resolution (reference for compressed)"},
        "compressed": {"task": FUSED_LONG, "cfg": {**cfg, "chunk_size": 16, "tree_height": 3, "node_keep": 2}, "train": {"steps": 3 * steps},
                           "note": "as long_full, tree height 3, node_keep 2: nodes of 8/4/2/2 tokens keep 2 states each (8 of 16)"},
        "deeper_slot": {"task": FUSED, "cfg": cfg, "train": {"steps": 5 * steps, "zero_gates": (0,)},
                            "note": "gate of slot 0 held at zero: upper layer 1 reads lower layer 1's states only"},
        "adapter_only": {"task": FUSED, "cfg": cfg, "train": {"steps": steps, "train_base": False}, "note": "random base frozen"},
        "adapter_only_pretrained": {"task": FUSED, "cfg": cfg, "train": {"steps": steps, "train_base": False}, "pretrain": steps,
                                        "note": "base first trained on the task in context (full attention over [context ; window]), "
                                             "then frozen; only the adapter learns to read through the injection"},
        "adapter_only_lora": {"task": FUSED, "cfg": {**cfg, "upper_lora_rank": 8}, "train": {"steps": steps, "train_base": False},
                                  "note": "random base frozen, upper_lora_rank=8"},
        "broken_gates": {"task": FUSED, "cfg": cfg, "train": {"steps": steps, "zero_gates": (0, 1)}, "note": "control: every gate held at zero"},
        "broken_keys": {"task": FUSED, "cfg": cfg, "train": {"steps": steps}, "hook": shuffled_keys, "note": "control: injected keys shuffled"},
        "pairs_default": {"task": PAIRS, "cfg": pairs_cfg, "train": {"steps": pair_steps}, "note": "two-token records, default path"},
        "pairs_reference": {"task": PAIRS, "cfg": pairs_cfg, "train": {"steps": pair_steps, "path": "reference"},
                                "note": "two-token records, plain cross-attention over un-sampled states"},
        "pairs_in_context": {"task": PAIRS, "cfg": pairs_cfg, "train": {"steps": pair_steps}, "in_context": True,
                                 "note": "two-token records, no injection: full attention over [context ; window]"},
    }


def run_arm(name: str, arm: dict, args) -> dict:
    task: LookupTask = arm["task"]
    cfg = SharedCtxConfig(**arm["cfg"])
    train = LookupTrainConfig(**{"eval_every": args.eval_every, "threads": args.threads, "seed": args.seed, **arm["train"]})
    print(f"== {name}: {arm['note']}", flush=True)
    log = lambda row: print("  ", row, flush=True)
    pretrained = None
    if arm.get("in_context"):
        result = train_in_context(base_model(task, seed=args.seed), task, train, log=log)
    else:
        if arm.get("pretrain"):
            print("   pre-training the base on the task in context (full attention)", flush=True)
            base = base_model(task, seed=args.seed)
            pretrained = train_in_context(base, task, dataclasses.replace(train, steps=arm["pretrain"]), log=log)
            llm = SharedLLM.from_model(base, None, config=cfg)  # cross-attention blocks copied from the trained layers
        else:
            llm = lookup_model(task, cfg, seed=args.seed)
        hook = arm["hook"]() if arm.get("hook") else None
        result = train_lookup(llm, task, train, hook=hook, log=log)
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "note": arm["note"], "task": dataclasses.asdict(task), "config": cfg.to_dict(),
           "train": {k: v for k, v in dataclasses.asdict(train).items()}, **result.to_dict()}
    if pretrained is not None:
        out["pretrain_in_context"] = {k: v for k, v in pretrained.to_dict().items() if k != "history"}
    out["reads"] = result.acc_true >= 0.9 and result.acc_unrelated <= result.chance + 0.1
    print(f"   -> steps {result.steps}, {result.seconds:.1f} s, loss {result.final_loss:.3f}, "
          f"acc true {result.acc_true:.3f} / unrelated {result.acc_unrelated:.3f} (chance {result.chance:.3f})", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    if pyplot is None:
        return
    names = list(result["arms"])
    fig, axes = pyplot.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, fmt in zip(axes, ("fused", "pairs")):
        for name in names:
            arm = result["arms"][name]
            if arm["task"]["format"] != fmt or not arm["history"]:
                continue
            steps = [h["step"] for h in arm["history"]]
            color = pyplot.cm.tab20(names.index(name) % 20)
            ax.plot(steps, [h["acc_true"] for h in arm["history"]], marker=".", color=color, label=f"{name} (true)")
            ax.plot(steps, [h["acc_unrelated"] for h in arm["history"]], ls=":", color=color)
        ax.axhline(1 / 16, color="grey", lw=0.8, ls="--", label="chance (1/16)")
        ax.set_title(f"{fmt} records: accuracy (solid: true context, dotted: unrelated)")
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact-match accuracy of the value token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=None, help="arms to run (default: all); results merge into an existing JSON")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the fused arms (deeper_slot: 5x)")
    ap.add_argument("--pair-steps", type=int, default=2000, help="training steps of the pairs arms")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for JSON and PNG (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="a few steps of two arms (smoke run)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.pair_steps, args.eval_every = 4, 4, 2
        args.arms = args.arms or ["default", "pairs_in_context"]
    torch.set_num_threads(args.threads)
    table = arms(args.steps, args.pair_steps)
    unknown = sorted(set(args.arms or ()) - set(table))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {sorted(table)}")
    previous = Path(args.out or RESULTS) / f"{output_name('learnability', args)}.json"
    done = json.loads(previous.read_text())["arms"] if args.arms and previous.is_file() else {}
    for name in args.arms or table:
        done[name] = run_arm(name, table[name], args)
    result = {"question": "does the injection path learn a content lookup (true vs unrelated context vs chance)?",
              "model": "tiny random LLaMA: 4 layers, hidden 64, 4 heads of 16, 2 KV heads; trained from scratch unless adapter_only",
              "arms": {name: done[name] for name in table if name in done}}
    return finish("learnability", result, args, plot)


if __name__ == "__main__":
    main()
