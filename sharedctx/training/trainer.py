"""Training recipes for the injection adapter: LM continuation, reconstruction and distillation (see `objectives`),
synthetic retrieval and instruction tasks, mixed by weight; reading diagnostics every ``eval_every`` steps.

A recipe is a TOML/JSON/YAML file read into `TrainConfig` (see ``recipes/``). The same code runs on the
CPU (float32, or bf16 autocast with ``autocast = "bf16-cpu"``) and on CUDA (bf16 autocast): only ``device`` differs. Only the cross-attention blocks are
trained by default. Each step: draw a task by its mixing weight, build a batch of `Example` rows, prepare the
injected states (split noise drawn from the trainer's own generator, so resuming replays it), run the decoder
with labels, backpropagate; AdamW with its own learning rate for the gates, linear warm-up then cosine decay,
gradient clipping and accumulation. Checkpoints hold the adapter, optimiser, schedule and every RNG state,
so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import SharedCtxConfig
from .checkpoint import CHECKPOINT, read_checkpoint, write_checkpoint
from .data import (
    IGNORE,
    TASKS,
    Example,
    TokenShards,
    build_shards,
    instruction_example,
    lm_example,
)
from .objectives import (
    TeacherTopK,
    base_logits,
    distill_example,
    full_kl,
    quiet_example,
    marker_ids,
    reconstruction_example,
    scored_positions,
    teacher_topk,
    topk_kl,
)
from .recipe import TrainConfig, load_recipe
from .teacher_store import TeacherStore

__all__ = ["TrainConfig", "Trainer", "load_recipe", "collate", "lr_factor", "summarize_log"]

logger = logging.getLogger(__name__)

LOG = "train_log.jsonl"
READING_LOG = "reading_log.jsonl"
def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def collate(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Right-pad rows to ``(B, T)`` input ids, labels (``-100`` on padding) and attention mask."""
    length = max(r.input_ids.numel() for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.input_ids.numel()
        ids[i, :n], labels[i, :n], mask[i, :n] = r.input_ids, r.labels, 1
    return ids, labels, mask, [r.context for r in rows]


def summarize_log(path: str | os.PathLike, *, window: int = 50) -> dict[str, Any]:
    """Steps, tokens, wall time and the mean loss of the first and last ``window`` logged steps of a JSONL log."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return {"steps": 0}
    first, last = rows[:window], rows[-window:]
    by_task: dict[str, list[float]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["loss"])
    return {
        "steps": rows[-1]["step"],
        "tokens": rows[-1]["tokens"],
        "train_s": rows[-1]["elapsed_s"],
        "mean_step_s": round(float(np.mean([r["step_s"] for r in rows])), 3),
        f"loss_first_{len(first)}": round(float(np.mean([r["loss"] for r in first])), 4),
        f"loss_last_{len(last)}": round(float(np.mean([r["loss"] for r in last])), 4),
        "loss_by_task_mean": {k: round(float(np.mean(v)), 4) for k, v in by_task.items()},
        "final_gates": rows[-1].get("gates"),
    }


class Trainer:
    """Runs a `TrainConfig` on a `SharedLLM` (built from ``config.model`` unless ``llm`` is given)."""

    def __init__(self, config: TrainConfig, llm: Any = None, shards: TokenShards | None = None) -> None:
        self.cfg = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if llm is None:
            from ..model import SharedLLM

            llm = SharedLLM.from_pretrained(
                config.model or None, adapter=False, config=SharedCtxConfig.from_dict(config.sharedctx), device=config.device
            )
        if config.init_adapter:
            llm.load_adapter(config.init_adapter)
            logger.warning("starting from the adapter in %s", config.init_adapter)
        self.llm = llm
        self.device = torch.device(llm.device)
        self.shards = shards if shards is not None else self._shards()
        leaked = sorted(set(config.holdout) & {d["name"] for d in self.shards.documents("train")})
        if leaked:
            raise ValueError(
                f"the token shards in {self.shards.dir} train on {leaked}, which this recipe holds out: build shards "
                "with the recipe's holdout (point `data` at an empty folder and the trainer builds them from `sources`)"
            )
        self.params = self._select_params()
        gates = [p for n, p in llm.adapter_named_parameters() if n.endswith("gate") and p.requires_grad]
        gate_ids = {id(p) for p in gates}
        rest = [p for p in self.params if id(p) not in gate_ids]
        groups = [g for g in ({"params": rest, "lr": config.lr}, {"params": gates, "lr": config.gate_lr, "weight_decay": 0.0}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self._instructions: list[dict[str, Any]] | None = None
        names = sorted(config.tasks)
        weights = np.array([config.tasks[n] for n in names], dtype=np.float64)
        self.task_names, self.task_p = names, weights / weights.sum()
        self.marker = marker_ids(llm.tokenizer, config.recon_marker) if llm.tokenizer is not None else None
        if config.tasks.get("distill") and llm.max_positions:
            longest = config.context_chunks[1] * self.chunk_size + config.window_range[1]
            if longest > llm.max_positions:
                raise ValueError(
                    f"the distill task's teacher reads up to {longest} tokens (context_chunks {config.context_chunks} of "
                    f"{self.chunk_size} + window {config.window}), past the base model's {llm.max_positions}-token window"
                )
        self._reading_tokens: tuple[np.ndarray, np.ndarray] | None = None
        self.teachers: TeacherStore | None = None
        self.teacher_counts = {"hits": 0, "misses": 0}
        if config.teacher_dir:
            self.teachers = TeacherStore(config.teacher_dir)
            self.teachers.check(llm, config, self.shards.dir)
            logger.info("distill teachers from %s (%d examples), the rest on the fly", config.teacher_dir, len(self.teachers))

    # ------------------------------------------------------------------ setup
    def _shards(self) -> TokenShards:
        data = Path(self.cfg.data)
        if not (data / "manifest.json").is_file():
            if not self.cfg.sources:
                raise FileNotFoundError(f"{data} holds no shards and the recipe gives no `sources` to build them from")
            missing = [s for s in self.cfg.sources if not os.path.exists(s)]
            if missing:
                raise FileNotFoundError(
                    f"the recipe's sources {missing} do not exist: set the environment variable they name "
                    "(e.g. SHAREDCTX_DATA=../shared/data) or pass `sharedctx train --sources DIR`"
                )
            logger.warning("tokenising %s into %s", self.cfg.sources, data)
            build_shards(self.cfg.sources, self.llm.tokenizer, data, holdout=self.cfg.holdout)
        return TokenShards(data)

    def _select_params(self) -> list[torch.nn.Parameter]:
        llm, kind = self.llm, self.cfg.trainable
        for p in llm.parameters():
            p.requires_grad_(False)
        for name, p in llm.adapter_named_parameters():
            if kind == "injection" or name.endswith("gate"):
                p.requires_grad_(True)
        llm.injection[: self.cfg.trainable_from].requires_grad_(False)  # blocks below keep their start (identity: gate 0)
        return [p for p in llm.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ sampling
    @property
    def chunk_size(self) -> int:
        return self.llm.config.chunk_size

    def sample_example(self, task: str) -> Example:
        rng, cfg, c = self.rng, self.cfg, self.chunk_size
        if task in ("lm", "distill", "quiet"):
            k = int(rng.integers(cfg.context_chunks[0], cfg.context_chunks[1] + 1))
            lo, hi = cfg.window_range
            window = lo if lo == hi else int(rng.integers(lo, hi + 1))  # a single length draws nothing (as before)
            if task == "quiet":
                seq, doc = self.shards.draw(window, rng, "train")
                return quiet_example(seq, self.shards.draw(k * c, rng, "train", exclude=doc)[0])
            seq = self.shards.sample(k * c + window, rng, "train")
            return (lm_example if task == "lm" else distill_example)(seq, context_tokens=k * c)
        if task == "reconstruction":
            k = int(rng.integers(max(1, cfg.context_chunks[0]), max(1, cfg.context_chunks[1]) + 1))
            with self._autocast():  # the walk encodes the kept nodes: in the dtype the step uses
                return reconstruction_example(
                    self.llm, self.shards.sample(k * c, rng, "train"), rng, marker=self.marker, span=cfg.recon_span,
                    level=cfg.recon_level, generator=self.gen,
                )
        k = int(rng.integers(max(1, cfg.task_chunks[0]), cfg.task_chunks[1] + 1))
        tok = self.llm.tokenizer
        if task == "instruction":
            if self._instructions is None:
                self._instructions = [json.loads(line) for line in Path(cfg.instruction_file).read_text().splitlines() if line.strip()]
            row = self._instructions[int(rng.integers(len(self._instructions)))]
            ctx = tok(row["context"], add_special_tokens=False)["input_ids"]
            return instruction_example(tok, ctx, row["question"], row["answer"])
        # the haystack: a random stretch of training text (generated filler when no text is long enough)
        try:
            doc = self.shards.sample(k * c, rng, "train")
        except ValueError:
            doc = None
        if task == "chunk_mention":
            return TASKS[task](tok, rng, length=k * c, chunk_size=c, filler=doc)
        return TASKS[task](tok, rng, length=k * c, filler=doc)

    def next_batch(self) -> list[Example]:
        task = self.task_names[int(self.rng.choice(len(self.task_names), p=self.task_p))]
        return [self.sample_example(task) for _ in range(self.cfg.batch_size)]

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        dtype = self.cfg.autocast_dtype(self.device.type)
        if dtype is not None:
            return torch.autocast(self.device.type, dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    def injection_for(self, rows: list[Example], ids: torch.Tensor, labels: torch.Tensor):
        """The states a batch reads: the walk its builder already made (reconstruction: the span was drawn from it,
        with the marker alone as the query), else a walk whose query is each row's tokens before its first label."""
        if all("selection" in r.meta for r in rows):
            return self.llm.assemble_injection([r.meta["selection"] for r in rows])
        return self.llm.prepare_injection([r.context for r in rows], ids, labels=labels, generator=self.gen)

    def teacher_for(self, row: Example) -> TeacherTopK:
        """A distill row's teacher ``(1, T, k)``: from ``teacher_dir`` when it holds the row (a hit), else computed on
        the fly (a miss, or every time without ``teacher_dir``)."""
        if self.teachers is not None:
            hit = self.teachers.get(row, self.device)
            if hit is not None:
                self.teacher_counts["hits"] += 1
                return hit
            if not self.teacher_counts["misses"]:
                logger.warning("the teacher shards in %s lack a distill example of step %d: computing it on the fly (misses are logged)",
                               self.teachers.dir, self.step + 1)
            self.teacher_counts["misses"] += 1
        return teacher_topk(self.llm, row, self.cfg.distill_top_k)

    def loss(self, rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's loss (cross-entropy on the labels, or for ``distill`` the top-k KL to the teacher on the
        same positions) and its ``(B, T)`` labels."""
        llm, cfg = self.llm, self.cfg
        pad = getattr(llm.tokenizer, "pad_token_id", None) or 0
        ids, labels, mask, _ = collate(rows, pad)
        ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
        with self._autocast():
            injection = self.injection_for(rows, ids, labels)
            if rows[0].task == "quiet":
                target = base_logits(llm, ids, mask)
                logits = llm(ids, attention_mask=mask, injection=injection).logits
                return full_kl(logits, target, scored_positions(labels)), labels
            if rows[0].task != "distill":
                return llm(ids, labels=labels, attention_mask=mask, injection=injection).loss, labels
            teacher = TeacherTopK.stack([self.teacher_for(r) for r in rows], ids.shape[1])
            logits = llm(ids, attention_mask=mask, injection=injection).logits
            return topk_kl(logits, teacher, scored_positions(labels), tail=cfg.distill_tail), labels

    def micro_step(self, rows: list[Example]) -> tuple[float, int]:
        """Forward and backward one micro-batch; returns its loss and the number of scored tokens."""
        loss, labels = self.loss(rows)
        (loss * self.cfg.task_scale.get(rows[0].task, 1.0) / self.cfg.grad_accum).backward()
        return float(loss.detach()), int((labels[:, 1:] != IGNORE).sum())

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        factor = lr_factor(self.step, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        for g, lr in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = lr * factor
        self.llm.train()
        t0 = time.perf_counter()
        counts = dict(self.teacher_counts)
        losses, tokens, tasks, window, context = [], 0, [], 0, 0
        for _ in range(cfg.grad_accum):
            rows = self.next_batch()
            loss, n = self.micro_step(rows)
            losses.append(loss)
            tokens += sum(r.input_ids.numel() + r.context.numel() for r in rows)
            tasks.append(rows[0].task)
            window = max([window] + [r.input_ids.numel() for r in rows])
            context = max([context] + [r.context.numel() for r in rows])
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip) if cfg.clip else torch.tensor(0.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += tokens
        self.elapsed += dt
        rec = {
            "step": self.step,
            "loss": float(np.mean(losses)),
            "task": tasks[0] if len(set(tasks)) == 1 else ",".join(tasks),
            "lr": self.opt.param_groups[0]["lr"],
            "grad_norm": float(norm),
            "tokens": self.tokens,
            "window": window,
            "context": context,
            "step_s": round(dt, 3),
            "tok_per_s": round(tokens / dt, 1),
            "elapsed_s": round(self.elapsed, 1),
            "gates": [round(float(b.gate_value().detach()), 4) for b in self.llm.injection],
        }
        if self.teachers is not None and "distill" in tasks:
            rec["teacher_hits"] = self.teacher_counts["hits"] - counts["hits"]
            rec["teacher_misses"] = self.teacher_counts["misses"] - counts["misses"]
        return rec

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().cpu().clone() for n, p in self.llm.named_parameters() if p.requires_grad},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "rng": self.rng.bit_generator.state,
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(self.llm.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoint/`` (safetensors + JSON, swapped in whole: see `checkpoint.write_checkpoint`)."""
        return write_checkpoint(self.out, self.state_dict())

    def resume(self) -> bool:
        """Load ``out_dir/checkpoint/`` if present; True when resumed. A pickled checkpoint is refused (see
        `checkpoint.read_checkpoint`): unpickling runs code."""
        state = read_checkpoint(self.out)
        if state is None:
            return False
        self.load_state_dict(state)
        logger.warning("resumed from %s at step %d", self.out / CHECKPOINT, self.step)
        return True

    def save_adapter(self, directory: str | os.PathLike | None = None) -> Path:
        directory = Path(directory) if directory else self.out / "adapter"
        self.llm.adapter_trained = self.step > 0
        self.llm.save_pretrained(directory)
        (directory / "training_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return directory

    # ------------------------------------------------------------------ reading diagnostics
    def _text_tokens(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.shards.tokens(name), dtype=np.int64)
        except KeyError:
            from ..index.documents import read_document

            if not os.path.isfile(name):
                raise FileNotFoundError(f"{name!r} is neither a document of the shards in {self.shards.dir} nor a file") from None
            return np.asarray(self.llm.tokenizer(read_document(name), add_special_tokens=False)["input_ids"], dtype=np.int64)

    def evaluate_reading(self) -> dict[str, Any]:
        """Run `reading.eval_reading` on ``eval_text`` against ``eval_control``, append the full result to
        ``out_dir/reading_log.jsonl`` and return a summary (reading, adaptation and copy gains in %, perplexities).
        Uses no RNG of the run, so evaluating never changes what training does."""
        from .reading import eval_reading

        cfg = self.cfg
        if self._reading_tokens is None:
            self._reading_tokens = (self._text_tokens(cfg.eval_text), self._text_tokens(cfg.eval_control))
        text, control = self._reading_tokens
        t0 = time.perf_counter()
        r = eval_reading(
            self.llm, text, control, context_tokens=cfg.eval_context_chunks * self.chunk_size, window=cfg.eval_window,
            n_windows=cfg.eval_windows, span=cfg.eval_span, marker=self.marker, seed=cfg.seed,
        )
        seconds = round(time.perf_counter() - t0, 1)
        with open(self.out / READING_LOG, "a") as fh:
            fh.write(json.dumps({"step": self.step, "eval_s": seconds, "text": cfg.eval_text, "control": cfg.eval_control, **r}) + "\n")
        summary = {k: round(r[k], 3) for k in ("reading_gain_pct", "adaptation_pct", "copy_gain_pct")}
        summary["copy_gain_by_level_pct"] = {lv: round(v, 3) for lv, v in r["copy_gain_by_level_pct"].items()}
        summary["ppl"] = {k: round(v, 3) for k, v in r["ppl"].items()}
        summary["eval_s"] = seconds
        logger.info("step %d reading: %s", self.step, summary)
        return summary

    # ------------------------------------------------------------------ loop
    def fit(self, *, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train until ``steps`` (or ``max_time_s``), logging JSONL to ``out_dir/train_log.jsonl``; returns a summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        start_step, start_wall = self.step, time.perf_counter()
        first_loss = None
        recent: list[float] = []
        reading: dict[str, Any] | None = None
        with open(self.out / LOG, "a") as log, tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step") as bar:
            while self.step < cfg.steps:
                rec = self.train_step()
                stop_step = bool(cfg.stop_at_step and self.step >= cfg.stop_at_step)
                out_of_time = bool(cfg.max_time_s and time.perf_counter() - start_wall > cfg.max_time_s)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step >= cfg.steps or stop_step or out_of_time):
                    rec["reading"] = reading = self.evaluate_reading()
                first_loss = rec["loss"] if first_loss is None else first_loss
                recent = (recent + [rec["loss"]])[-50:]
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or "reading" in rec:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if on_log:
                        on_log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", avg=f"{np.mean(recent):.3f}", tps=rec["tok_per_s"])
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop_step:
                    logger.warning("stopping at step %d (stop_at_step) of a %d-step schedule", self.step, cfg.steps)
                    break
                if out_of_time:
                    logger.warning("stopping at step %d: max_time_s=%s reached", self.step, cfg.max_time_s)
                    break
        self.save_checkpoint()
        adapter = self.save_adapter()
        summary = {**summarize_log(self.out / LOG), "threads": torch.get_num_threads(), "device": str(self.device)}
        (adapter / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "tokens": self.tokens,
            "train_s": round(self.elapsed, 1),
            "adapter": str(adapter),
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            **({"teacher": dict(self.teacher_counts)} if self.teachers is not None else {}),
            **({"reading": reading} if reading is not None else {}),
        }
