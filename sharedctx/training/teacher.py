"""Precompute the distillation teacher of a recipe's distill examples, resumably: ``sharedctx train teacher``.

The ``distill`` objective's teacher is the frozen base model reading ``[context ; window]`` in full attention
(`objectives.teacher_topk`): a full-length forward pass per example, the most expensive part of a distill step. It
does not depend on the adapter, so it can be computed ahead of training, on another machine or while nothing else
runs, and read back by the trainer (``teacher_dir`` in the recipe, or ``sharedctx train --teacher-dir DIR``).

`precompute_teacher` draws the examples the trainer will draw: it builds the recipe's `Trainer` (same seed, shards,
task mix and builders) and calls its sampler step by step as training would (``grad_accum`` micro-batches of
``batch_size`` rows; reconstruction examples run their walks), computing the teacher of each distill example in the
trainer's precision and writing them in shards (`teacher_store`). The trainer looks an example's teacher up by the
hash of its tokens, so nothing depends on the step it is drawn at: a resumed training run finds its teachers, and an
example the shards lack (beyond ``--examples``, or drawn differently) is computed on the fly and counted as a miss.

Resumable: after each shard the sampler's state (NumPy and torch generators, step) goes into the manifest, and a
resumed precomputation checks every shard's checksum, keeps the good ones, rewrites a damaged or torn one (and those
after it) and continues from the state after the last good shard, so it writes the same shards as an uninterrupted
run. Draws can only drift from training's in one way: the torch generator is not advanced by the student's walks
(which precomputing does not run), so reconstruction spans may differ; the NumPy stream that picks distill examples
shifts only when a bounded integer draw rejects (probability below 1e-6 per draw), and then later lookups miss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from .objectives import teacher_topk
from .recipe import TrainConfig, load_recipe
from .teacher_store import (
    decode_generator_state,
    encode_generator_state,
    precision_settings,
    prepare_directory,
    sampler_settings,
    teacher_settings,
    write_manifest,
    write_shard,
)
from .trainer import Trainer

__all__ = ["add_teacher_parser", "precompute_teacher"]

logger = logging.getLogger(__name__)


def precompute_teacher(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    examples: int | None = None,
    llm: Any = None,
    shards: Any = None,
    shard_examples: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the teacher of the distill examples ``config``'s trainer draws, resuming in ``out_dir``.

    Args:
        config: the training recipe (its ``teacher_dir`` is the default ``out_dir``).
        out_dir: the folder of shards; created, or resumed when it holds shards of the same recipe and model.
        examples: stop once at least this many distill examples are stored (the step that reaches it is finished);
            None: every distill example of the recipe's ``steps``.
        llm, shards: the model and token shards (as for `Trainer`; built from the recipe when None).
        shard_examples: distill examples per shard (closed at the end of a training step): what an interruption can lose.
        progress: a tqdm bar of stored examples.

    Returns a summary: ``examples`` (stored in all), ``computed`` (this call), ``kept`` (from before), ``rewritten``
    (damaged shards dropped and drawn again), ``shards``, ``steps`` (training steps drawn), ``teacher_s`` and
    ``s_per_example`` (teacher passes of this call), ``elapsed_s``, ``complete`` (the target or the schedule reached).
    Raises TeacherMismatchError when ``out_dir`` holds shards of another recipe or model, TeacherShardError when
    it holds files that are not shards.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    target = out_dir or config.teacher_dir
    if not target:
        raise ValueError("say where the teacher shards go: --out DIR (or teacher_dir in the recipe)")
    if not config.tasks.get("distill"):
        raise ValueError(f"the recipe's tasks {config.tasks} have no distill weight: there is no teacher to precompute")
    if shard_examples < 1 or (examples is not None and examples < 1):
        raise ValueError("examples and shard_examples must be at least 1")
    out = Path(target)
    # the recipe's own trainer is the sampler; it writes nothing but its out_dir folder, here the shards' folder
    trainer = Trainer(dataclasses.replace(config, teacher_dir=None, out_dir=str(out), progress=False, eval_every=0), llm=llm, shards=shards)
    cfg = trainer.cfg
    settings = {
        "teacher": teacher_settings(trainer.llm, cfg),
        "sampler": sampler_settings(cfg, trainer.shards.dir),
        "precision": precision_settings(trainer.llm, cfg),
    }
    manifest, rewritten = prepare_directory(out, settings)
    step = stored = 0
    if manifest["shards"]:
        last = manifest["shards"][-1]
        trainer.rng.bit_generator.state = last["rng"]
        trainer.gen.set_state(decode_generator_state(last["gen"]))
        step, stored = last["steps"], last["draws"]
    kept = stored
    pending: list[tuple[Any, Any]] = []
    teacher_s = 0.0

    def done() -> bool:
        return step >= cfg.steps or (examples is not None and stored + len(pending) >= examples)

    with tqdm(total=examples, initial=stored, disable=not progress, unit="example", desc="teacher") as bar:
        while not done():
            trainer.llm.train()  # the sampler's walks run as in a training step
            with torch.no_grad():
                for _ in range(cfg.grad_accum):
                    rows = trainer.next_batch()
                    if rows[0].task != "distill":
                        continue
                    t1 = time.perf_counter()
                    with trainer._autocast():  # the teacher in the precision the training step computes it
                        pending += [(r, teacher_topk(trainer.llm, r, cfg.distill_top_k)) for r in rows]
                    teacher_s += time.perf_counter() - t1
                    bar.update(len(rows))
            step += 1
            if pending and (len(pending) >= shard_examples or done()):
                entry = write_shard(out, len(manifest["shards"]), pending)
                stored += len(pending)
                entry.update(steps=step, draws=stored, rng=trainer.rng.bit_generator.state, gen=encode_generator_state(trainer.gen))
                manifest["shards"].append(entry)
                write_manifest(out, manifest)  # the shard is in place before the manifest names it
                pending = []
                bar.set_postfix(step=step, shards=len(manifest["shards"]))
    computed = stored - kept
    summary = {
        "dir": str(out),
        "examples": stored,
        "computed": computed,
        "kept": kept,
        "rewritten": rewritten,
        "shards": len(manifest["shards"]),
        "steps": step,
        "teacher_s": round(teacher_s, 2),
        "s_per_example": round(teacher_s / computed, 3) if computed else None,
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "complete": done(),
    }
    logger.info("teacher shards: %s", summary)
    return summary


# ---------------------------------------------------------------------- command line
def add_teacher_parser(train: argparse.ArgumentParser) -> None:
    """Register ``sharedctx train teacher`` under the ``train`` command's parser."""
    sub = train.add_subparsers(dest="train_command", metavar="{teacher}")
    p = sub.add_parser(
        "teacher", help="precompute the distillation teacher of a recipe's distill examples (resumable)",
        description="Draw the distill examples the recipe's trainer will draw and store their teacher (the base model "
        "reading context + window in full attention: top-k log-probabilities and tail mass per scored position) in "
        "safetensors shards. Run it again to resume; train with teacher_dir = DIR (or --teacher-dir DIR).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="recipe file, e.g. recipes/smollm2-cpu-reading.toml")
    p.add_argument("--out", default=None, metavar="DIR", help="where the shards go (default: the recipe's teacher_dir)")
    p.add_argument("--examples", type=int, default=None, metavar="N", help="stop after N distill examples (default: all of the recipe's steps)")
    p.add_argument("--shard-examples", type=int, default=16, metavar="N", help="distill examples per shard (default 16)")
    p.add_argument("--device", default=None, help="override the recipe's device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--sources", action="append", default=None, metavar="DIR", help="text files/folders to tokenise (overrides the recipe's sources)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_teacher)


def _cmd_teacher(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"device": args.device, "threads": args.threads}
    if args.sources:
        overrides["sources"] = [str(Path(s).resolve()) for s in args.sources]
    cfg = load_recipe(args.config, **overrides)
    summary = precompute_teacher(cfg, args.out, examples=args.examples, shard_examples=args.shard_examples, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0
