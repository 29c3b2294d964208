"""Finding-things tasks as (context text, question, answers): passkey and RULER-style needles and variable tracking.

The passkey task is `sharedctx.data.passkey_example` (the one training uses), decoded to text. The RULER-style
tasks follow RULER's templates (Hsieh et al., 2024): needles "One of the special magic numbers for {key} is:
{value}." hidden in book text, asked about singly (``niah_single``), among distractor keys (``niah_multikey``),
all values of one key (``niah_multivalue``), several keys at once (``niah_multiquery``); and variable tracking
(``vt``): a chain of assignments ``VAR A = 12345. VAR B = VAR A. ...`` whose members are all to be named.
A task's score is the fraction of its answers contained in the output (case-insensitive), as RULER's
``string_match_all``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Task", "TASK_NAMES", "make_task", "score", "filler_tokens"]

TASK_NAMES = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")

_KEYS = (
    "apricot", "borealis", "cobalt", "dunmore", "elderberry", "falconry", "gossamer", "hinterland", "isthmus",
    "jubilee", "kaleidoscope", "labyrinth", "mandolin", "nightjar", "oleander", "porcelain", "quicksilver",
    "rhubarb", "saffron", "tamarind", "ultramarine", "vermilion", "wanderlust", "xylophone", "yarrow", "zeppelin",
)
_NEEDLE = "One of the special magic numbers for {key} is: {value}."


@dataclass
class Task:
    name: str
    context: str
    question: str
    answers: list[str]
    depth: float
    meta: dict[str, Any] = field(default_factory=dict)


def filler_tokens(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of a haystack text (book prose), tokenized once and sliced per trial."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _hide(tokenizer: Any, filler: np.ndarray, length: int, needles: Sequence[str], depths: Sequence[float], rng: np.random.Generator) -> str:
    """Text of about ``length`` tokens: a slice of ``filler`` with each needle sentence at its fractional depth."""
    need = sum(len(tokenizer(" " + n + " ", add_special_tokens=False)["input_ids"]) for n in needles)
    n = max(1, length - need)
    if len(filler) < n:
        filler = np.tile(filler, n // len(filler) + 1)
    start = int(rng.integers(0, len(filler) - n + 1))
    hay = filler[start : start + n]
    parts, prev = [], 0
    for needle, depth in sorted(zip(needles, depths), key=lambda x: x[1]):
        at = max(prev, min(n, int(round(depth * n))))
        parts += [tokenizer.decode(hay[prev:at].tolist()), " " + needle + " "]
        prev = at
    parts.append(tokenizer.decode(hay[prev:].tolist()))
    return "".join(parts)


def _number(rng: np.random.Generator, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def make_task(name: str, tokenizer: Any, rng: np.random.Generator, *, length: int, depth: float, filler: np.ndarray) -> Task:
    """One trial of task ``name`` with about ``length`` context tokens, its target at ``depth`` in [0, 1]."""
    if name == "passkey":
        from sharedctx.training.data import passkey_example

        ex = passkey_example(tokenizer, rng, length=length, depth=depth)
        question = "What is the pass key hidden in the text? Answer with the number only."
        return Task(name, tokenizer.decode(ex.context.tolist()), question, [ex.meta["key"]], depth)
    keys = [str(k) for k in rng.choice(_KEYS, size=4, replace=False)]
    others = sorted(float(x) for x in rng.random(3))
    if name == "niah_single":
        value = _number(rng)
        ctx = _hide(tokenizer, filler, length, [_NEEDLE.format(key=keys[0], value=value)], [depth], rng)
        q = f"What is the special magic number for {keys[0]} mentioned in the provided text? Answer with the number only."
        return Task(name, ctx, q, [value], depth)
    if name in ("niah_multikey", "niah_multiquery"):
        values = [_number(rng) for _ in keys]
        ctx = _hide(tokenizer, filler, length, [_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)], [depth] + others, rng)
        if name == "niah_multikey":
            q = f"What is the special magic number for {keys[0]} mentioned in the provided text? Answer with the number only."
            return Task(name, ctx, q, [values[0]], depth)
        q = f"What are the special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text? Answer with the numbers only."
        return Task(name, ctx, q, values[:2], depth)
    if name == "niah_multivalue":
        values = [_number(rng) for _ in range(4)]
        ctx = _hide(tokenizer, filler, length, [_NEEDLE.format(key=keys[0], value=v) for v in values], [depth] + others, rng)
        q = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? Answer with the numbers only."
        return Task(name, ctx, q, values, depth)
    if name == "vt":
        value = _number(rng, 5)
        names = ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=5)) for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        span = min(0.5, 1.0 - depth)  # the chain starts at ``depth`` and spreads over at most half the text
        depths = [depth + span * i / (len(chain) - 1) for i in range(len(chain))]
        ctx = _hide(tokenizer, filler, length, chain, depths, rng)
        q = f"Find all variables that are assigned the value {value} in the text above. Answer with the variable names only."
        return Task(name, ctx, q, names, depth)
    raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")


def score(task: Task, answer: str) -> float:
    """Fraction of the task's answers contained in ``answer`` (case-insensitive)."""
    low = answer.lower()
    return sum(a.lower() in low for a in task.answers) / len(task.answers)
