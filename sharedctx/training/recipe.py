"""Training recipes: `TrainConfig` (every option of a run, validated) and `load_recipe` (a TOML/JSON/YAML file of
them, paths resolved against the recipe and environment variables expanded)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SharedCtxConfig
from ..errors import MissingDependencyError, RecipeError
from .data import TASKS
from .objectives import MARKER, TAILS

__all__ = ["TrainConfig", "load_recipe", "TEXT_TASKS", "AUTOCAST"]


#: ``autocast`` values: bf16 on CUDA only, bf16 on CUDA and the CPU, never
AUTOCAST = ("bf16", "bf16-cpu", "none")

#: tasks built from training text by the trainer itself (the synthetic ones are in `data.TASKS`)
TEXT_TASKS = ("lm", "reconstruction", "distill", "quiet", "instruction")


@dataclass
class TrainConfig:
    """A training recipe (all lengths in tokens).

    Attributes:
        model: base model id or folder; None for the default SmolLM2-135M-Instruct.
        out_dir: where checkpoints, the JSONL log and the final adapter (``out_dir/adapter``) go.
        data: folder of shards (`sharedctx.data.build_shards`); built from ``sources`` when missing.
        sources: text files/folders to tokenise when ``data`` holds no manifest.
        holdout: documents of ``sources`` never trained on.
        sharedctx: `SharedCtxConfig` fields of the adapter (its ``chunk_size`` is what inference uses).
        context_chunks: ``[min, max]`` chunks of context per LM sample (drawn uniformly).
        window: decoder window of an ``lm``, ``distill`` or ``quiet`` sample (loss on all of it but the first token):
            a length, or ``[min, max]`` to draw each example's length uniformly in that range (so the adapter sees
            the window lengths it will serve).
        tasks: mixing weights: ``lm``, ``reconstruction``, ``distill``, ``quiet``, ``passkey``, ``kv``, ``needle``,
            ``chunk_mention``, ``instruction`` (docs/training.md describes each).
        recon_span, recon_level, recon_marker: reconstruction: the window is ``recon_marker`` then a context span of
            ``recon_span`` tokens drawn inside a node the walk keeps at the finest level (``recon_level="finest"``) or
            at any level (``"any"``); contexts of ``context_chunks`` chunks (at least 1).
        distill_top_k, distill_tail: distillation: KL to the base model reading ``[context ; window]`` in full
            attention, from its top-k log-probabilities; the tail as one more outcome (``bucket``) or dropped with
            both distributions renormalised (``renormalise``). Context + window must fit the base model's window.
        teacher_dir: a folder of precomputed teacher shards (``sharedctx train teacher``; `teacher.precompute_teacher`)
            to read distill teachers from; an example it lacks is computed on the fly (hits and misses are logged).
            None: every teacher on the fly. Shards of another base model, top-k, tail, window, context chunks or
            chunk size are refused.
        eval_every: run the reading diagnostics (`reading.eval_reading`) every this many steps and at the end (0: never);
            results go to ``out_dir/reading_log.jsonl`` and, summarised, into the step's log record.
        eval_text, eval_control: the held-out text and a same-genre unrelated text for the control: a document name
            of the shards (e.g. ``books/pride_and_prejudice.txt``) or a file path.
        eval_windows, eval_context_chunks, eval_window, eval_span: stretches per evaluation, context chunks, window
            tokens and repeated-span tokens of the diagnostics.
        task_scale: a factor on each named task's loss before backpropagation (default 1; the logged loss is
            unscaled), to balance tasks whose gradients differ in size (the mixing weights only set how often each
            task is drawn).
        task_chunks: ``[min, max]`` chunks of context for the synthetic tasks.
        instruction_file: JSONL of ``{"context": ..., "question": ..., "answer": ...}`` for the ``instruction`` task.
        init_adapter: an adapter folder to start from (fine-tuning: e.g. another policy or other tasks) instead of
            the identity; it must fit the base model and ``sharedctx`` shapes.
        trainable: ``injection``: every adapter parameter (the cross-attention blocks and, with
            ``[sharedctx] upper_lora_rank > 0``, the upper layers' low-rank updates: the way to train more than the
            paper's blocks without touching the base model); ``gates``: the gates only.
        trainable_from: train only the cross-attention blocks of layers ``>= trainable_from`` (counting from 0); the
            blocks below keep what they start with (the identity: gate 0, so those layers run the base model exactly;
            or an ``init_adapter``'s values). 0 (the default) trains every block. "Only the upper layers read"
            (issue 25): the blocks below still run, so this tests the idea, not its cost.
        steps: optimiser steps; batch_size rows per micro-batch; grad_accum micro-batches per step.
        lr, gate_lr, warmup, min_lr_ratio, weight_decay, clip: AdamW and schedule.
        device: ``cpu``, ``cuda``...; autocast: ``bf16`` on CUDA only (the CPU runs float32, as every recipe recorded
            before issue 25), ``bf16-cpu`` on CUDA and on the CPU too (1.5-3x faster on a CPU with AMX/AVX512-BF16:
            docs/training.md), ``none`` never.
        threads: torch CPU threads (0 leaves torch's default).
        max_time_s: stop (saving a checkpoint and the adapter) after this much wall time; 0 for no limit.
        stop_at_step: stop (saving a checkpoint and the adapter) once this step is done, keeping the schedule of
            ``steps`` (a first phase of a longer run); 0 runs to ``steps``.
    """

    model: str | None = None
    out_dir: str = "runs/sharedctx"
    data: str = "runs/shards"
    sources: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    sharedctx: dict[str, Any] = field(default_factory=dict)
    context_chunks: list[int] = field(default_factory=lambda: [4, 4])
    window: int | list[int] = 4096
    tasks: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    task_scale: dict[str, float] = field(default_factory=dict)
    task_chunks: list[int] = field(default_factory=lambda: [1, 4])
    instruction_file: str | None = None
    recon_span: int = 64
    recon_level: str = "finest"
    recon_marker: str = MARKER
    distill_top_k: int = 32
    distill_tail: str = "bucket"
    teacher_dir: str | None = None
    eval_every: int = 0
    eval_text: str | None = None
    eval_control: str | None = None
    eval_windows: int = 2
    eval_context_chunks: int = 2
    eval_window: int = 256
    eval_span: int = 64
    init_adapter: str | None = None
    trainable: str = "injection"
    trainable_from: int = 0
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    gate_lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    device: str = "cpu"
    autocast: str = "bf16"
    threads: int = 0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    max_time_s: float = 0.0
    stop_at_step: int = 0
    progress: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: a later check would fail on a wrong-typed value with a traceback
            value = getattr(self, f.name)
            if not _fits(value, str(f.type)):
                raise RecipeError(f"TrainConfig.{f.name} must be {_describe(str(f.type))}, got {value!r} ({type(value).__name__})")
        for name in ("context_chunks", "task_chunks"):
            pair = getattr(self, name)
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise RecipeError(f"TrainConfig.{name} must be [min, max] with 0 <= min <= max, got {pair!r}")
        for name, least in (("steps", 0), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("checkpoint_every", 0),
                            ("eval_every", 0), ("threads", 0), ("stop_at_step", 0), ("warmup", 0), ("max_time_s", 0)):
            if getattr(self, name) < least:
                what = {"checkpoint_every": " (0: never)", "eval_every": " (0: never)", "max_time_s": " (0: no limit)"}.get(name, "")
                raise RecipeError(f"TrainConfig.{name} must be >= {least}{what}, got {getattr(self, name)!r}")
        unknown = sorted(set(self.tasks) - set(TASKS) - set(TEXT_TASKS))
        if unknown:
            raise RecipeError(f"unknown tasks {unknown}; known: {', '.join(TEXT_TASKS)}, {', '.join(TASKS)}")
        if not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise RecipeError(f"TrainConfig.tasks must give non-negative weights with a positive sum, got {self.tasks}")
        if set(self.task_scale) - set(self.tasks) or any(v <= 0 for v in self.task_scale.values()):
            raise RecipeError(f"TrainConfig.task_scale must give positive factors for tasks of `tasks`, got {self.task_scale}")
        if self.tasks.get("instruction") and not self.instruction_file:
            raise RecipeError("the 'instruction' task needs instruction_file = a JSONL of {context, question, answer}")
        if self.trainable not in ("injection", "gates"):
            raise RecipeError(
                f"TrainConfig.trainable must be 'injection' (every adapter parameter) or 'gates', got {self.trainable!r}; "
                "to train more than the cross-attention, set upper_lora_rank in the recipe's [sharedctx] table"
            )
        m = SharedCtxConfig.from_dict(self.sharedctx).injection_layers  # validates the [sharedctx] table early
        if not 0 <= self.trainable_from < m:
            raise RecipeError(
                f"TrainConfig.trainable_from must be a layer with a cross-attention block, 0 <= trainable_from < "
                f"injection_layers = {m}, got {self.trainable_from!r}"
            )
        if self.recon_level not in ("finest", "any") or self.recon_span < 1 or not self.recon_marker:
            raise RecipeError(
                f"reconstruction needs recon_level 'finest' or 'any', recon_span >= 1 and a non-empty recon_marker, "
                f"got {self.recon_level!r}, {self.recon_span}, {self.recon_marker!r}"
            )
        if self.autocast not in AUTOCAST:
            raise RecipeError(f"TrainConfig.autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.distill_tail not in TAILS or self.distill_top_k < 1:
            raise RecipeError(f"distill_tail must be one of {TAILS} and distill_top_k >= 1, got {self.distill_tail!r}, {self.distill_top_k}")
        if self.eval_every and not (self.eval_text and self.eval_control):
            raise RecipeError("eval_every > 0 needs eval_text (held-out text) and eval_control (an unrelated text of the same genre)")
        if self.eval_windows < 1 or self.eval_context_chunks < 1 or self.eval_window < 2 or self.eval_span < 1:
            raise RecipeError(f"eval_windows >= 1, eval_context_chunks >= 1, eval_window >= 2 and eval_span >= 1 are required, got "
                              f"{self.eval_windows}, {self.eval_context_chunks}, {self.eval_window}, {self.eval_span}")
        lo, hi = self.window_range
        if not 2 <= lo <= hi:
            raise RecipeError(f"TrainConfig.window must be a length >= 2 or [min, max] with 2 <= min <= max, got {self.window!r}")

    def autocast_dtype(self, device_type: str) -> torch.dtype | None:
        """The autocast dtype of a step on ``device_type`` (``cpu``, ``cuda``...), or None for none."""
        if self.autocast == "bf16-cpu" or (self.autocast == "bf16" and device_type == "cuda"):
            return torch.bfloat16
        return None

    @property
    def window_range(self) -> tuple[int, int]:
        """``(min, max)`` window length (equal for a single length)."""
        w = self.window
        if isinstance(w, (list, tuple)):
            if len(w) != 2 or not all(_fits(x, "int") for x in w):
                raise RecipeError(f"TrainConfig.window must be a length or [min, max], got {w!r}")
            return int(w[0]), int(w[1])
        return int(w), int(w)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Read a recipe from ``.toml``, ``.json`` or ``.yaml``/``.yml`` (YAML needs pyyaml); relative paths in
    ``data``, ``sources``, ``out_dir``, ``instruction_file``, ``init_adapter`` and ``teacher_dir`` are resolved against the recipe's folder,
    after expanding environment variables (``sources = ["$SHAREDCTX_DATA"]``); a variable left unset stays as written
    and the trainer names it if it needs that path."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = "is a directory" if path.is_dir() else "does not exist" if not path.exists() else f"cannot be read ({exc})"
        raise RecipeError(f"the recipe {path} {why}: give a recipe file, e.g. --config recipes/smollm2-cpu.toml") from exc
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise RecipeError(f"{path}: recipes are .toml, .json or .yaml files")
    try:
        data = _parse(text, suffix, path)
    except (ValueError, _yaml_error()) as exc:
        kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
        raise RecipeError(f"{path} is not valid {kind}: {exc}; fix the line it names") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a table of recipe keys (key = value), not a {type(data).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    data.update(overrides)
    base = path.parent

    def resolve(p: str) -> str:
        p = os.path.expandvars(p)
        return p if os.path.isabs(p) or "$" in p else os.path.normpath(base / p)

    for key in ("data", "out_dir", "instruction_file", "init_adapter", "teacher_dir"):
        if data.get(key) and key not in overrides:
            data[key] = resolve(data[key])
    try:
        if "sources" in data and isinstance(data["sources"], list) and "sources" not in overrides:
            data["sources"] = [resolve(s) if isinstance(s, str) else s for s in data["sources"]]
        return TrainConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{path}: {exc}") from exc


def _parse(text: str, suffix: str, path: Path) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError as exc:
        raise MissingDependencyError(f"reading {path} needs pyyaml (`pip install pyyaml`), or write the recipe as TOML or JSON") from exc
    return yaml.safe_load(text)


def _yaml_error() -> type[Exception]:
    try:
        import yaml
    except ImportError:
        return ValueError
    return yaml.YAMLError


def _fits(value: Any, annotation: str) -> bool:
    """Whether ``value`` has a type of ``annotation`` (the field's annotation as written: ``int | list[int]``...)."""
    for option in _options(annotation):
        if option == "None" and value is None or option == "Any":
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if (option == "int" and isinstance(value, int) or option == "float" and isinstance(value, (int, float))
                or option == "str" and isinstance(value, str)):
            return True
        if option.startswith("list[") and isinstance(value, (list, tuple)):
            if all(_fits(v, option[5:-1]) for v in value):
                return True
        if option.startswith("dict[") and isinstance(value, dict):
            key, _, item = option[5:-1].partition(",")
            if all(_fits(k, key.strip()) and _fits(v, item.strip()) for k, v in value.items()):
                return True
    return False


def _options(annotation: str) -> list[str]:
    """``int | list[int]`` -> ``["int", "list[int]"]`` (split at the top level only)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(annotation[start:i].strip())
            start = i + 1
    return [*out, annotation[start:].strip()]


def _describe(annotation: str) -> str:
    words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "unset",
             "list[int]": "a list of integers", "list[str]": "a list of strings", "dict[str, float]": "a table of numbers",
             "dict[str, Any]": "a table"}
    return " or ".join(words.get(o, o) for o in _options(annotation))
