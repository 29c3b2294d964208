"""A synthetic lookup task that only reading the injected context can solve, and a small training loop for it.

The context holds fresh random key -> value records; the window asks some keys and is scored on the value token after
each. Nothing in the window or the weights tells a value: without reading the context through the injection a model
stays at chance (``1 / n_values``), and so must the same model given an unrelated context (other records), so that
accuracy with the true context measures reading, not adaptation. For ``tests/test_learnability.py`` and
``benchmarks/bench_learnability.py``::

    task = LookupTask()
    llm = lookup_model(task, SharedCtxConfig(injection_layers=2, chunk_size=4, tree_height=1, node_keep=2, policy="right"))
    result = train_lookup(llm, task, LookupTrainConfig(steps=400))   # base + adapter, from scratch
    result.acc_true, result.acc_unrelated, result.chance

Formats: ``fused`` writes a record as one token (its id encodes key and value), a one-hop lookup that any injected
layer can do. ``pairs`` writes ``k v``: the state of ``v`` holds its key only through the lower layers'
self-attention, so the lookup needs a binding learnt there first (an induction-like two-hop circuit) and a layer
above the first to read it; one injected layer cannot solve it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sharedctx.config import SharedCtxConfig
from sharedctx.injection import Injection
from sharedctx.model import SharedLLM
from sharedctx.ops.sampling import sample_indices
from sharedctx.testing import tiny_model

__all__ = [
    "LookupBatch", "LookupResult", "LookupTask", "LookupTrainConfig", "base_model", "batch_injection",
    "evaluate", "kept_positions", "lookup_model", "reference_injection", "shuffled_keys", "train_in_context", "train_lookup",
]

IGNORE = -100
BOS = 1
_FIRST = 4  # ids 0-3: pad, bos, eos, spare
InjectionHook = Callable[[Injection], Injection]


@dataclass(frozen=True)
class LookupTask:
    """Key -> value lookup over fresh random records.

    Attributes:
        n_keys, n_values: sizes of the key and value alphabets (keys are distinct within a context).
        chunk_size: tokens per context chunk (the model's ``SharedCtxConfig.chunk_size``).
        chunks: ``(min, max)`` chunks of context, drawn once per batch.
        queries: keys asked per window, ``<bos> k1 v1 k2 v2 ...``, scored on each ``v``.
        format: ``fused`` (one token a record) or ``pairs`` (``k v``, two tokens a record).
    """

    n_keys: int = 16
    n_values: int = 16
    chunk_size: int = 4
    chunks: tuple[int, int] = (1, 4)
    queries: int = 4
    format: Literal["fused", "pairs"] = "fused"

    def __post_init__(self) -> None:
        if self.format not in ("fused", "pairs"):
            raise ValueError(f"LookupTask.format must be 'fused' or 'pairs', got {self.format!r}")
        if not 1 <= self.chunks[0] <= self.chunks[1] or self.records_per_chunk * self.chunks[1] > self.n_keys:
            raise ValueError("need 1 <= chunks[0] <= chunks[1] and n_keys >= the records of the longest context")
        if not 1 <= self.queries <= self.records_per_chunk * self.chunks[0]:
            raise ValueError("need 1 <= queries <= the records of the shortest context")

    @property
    def records_per_chunk(self) -> int:
        return self.chunk_size // (2 if self.format == "pairs" else 1)

    @property
    def vocab_size(self) -> int:
        return _FIRST + self.n_keys + self.n_values + (self.n_keys * self.n_values if self.format == "fused" else 0)

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def _key(self, k: torch.Tensor) -> torch.Tensor:
        return _FIRST + k

    def _value(self, v: torch.Tensor) -> torch.Tensor:
        return _FIRST + self.n_keys + v

    def sample(self, batch: int, n_chunks: int, generator: torch.Generator) -> LookupBatch:
        """``batch`` rows with ``n_chunks`` chunks of context each, their windows, and an unrelated context per row."""
        n = self.records_per_chunk * n_chunks

        def context() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            keys = torch.stack([torch.randperm(self.n_keys, generator=generator)[:n] for _ in range(batch)])
            values = torch.randint(0, self.n_values, (batch, n), generator=generator)
            if self.format == "pairs":
                ids = torch.stack([self._key(keys), self._value(values)], dim=-1).reshape(batch, 2 * n)
            else:
                ids = _FIRST + self.n_keys + self.n_values + keys * self.n_values + values
            return ids, keys, values

        ids, keys, values = context()
        unrelated = context()[0]
        asked = torch.stack([torch.randperm(n, generator=generator)[: self.queries] for _ in range(batch)])
        body = torch.stack([self._key(keys.gather(1, asked)), self._value(values.gather(1, asked))], dim=-1)
        window = torch.cat([torch.full((batch, 1), BOS), body.reshape(batch, 2 * self.queries)], dim=1)
        labels = torch.full_like(window, IGNORE)
        labels[:, 2::2] = window[:, 2::2]
        position = asked if self.format == "fused" else 2 * asked + 1  # the token whose state holds the value
        return LookupBatch(ids, unrelated, window, labels, position)


@dataclass
class LookupBatch:
    """``context``/``unrelated`` ``(B, L)`` token ids; ``window``/``labels`` ``(B, T)`` (labels -100 but on values);
    ``position`` ``(B, queries)``: where in the context the value of each question sits (its record's value token)."""

    context: torch.Tensor
    unrelated: torch.Tensor
    window: torch.Tensor
    labels: torch.Tensor
    position: torch.Tensor


@dataclass
class LookupTrainConfig:
    """The training loop: AdamW, linear warm-up then a constant rate, gradient clipping at 1.

    Attributes:
        train_base: also train the base model (from scratch); False trains the adapter only (what
            ``SharedLLM.adapter_named_parameters`` names: cross-attention blocks and any upper-layer LoRA).
        path: ``tree`` injects through the library's tree path (`batch_injection`); ``reference`` through plain
            cross-attention over every state of the whole context (`reference_injection`).
        zero_gates: slots whose gate is held at 0 (not trained): ``(0,)`` makes the model read deeper layers only.
        eval_every, eval_examples: accuracy on fresh examples logged to ``history`` every so many steps.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    gate_lr: float = 3e-2
    warmup: int = 20
    train_base: bool = True
    path: Literal["tree", "reference"] = "tree"
    zero_gates: tuple[int, ...] = ()
    seed: int = 0
    eval_every: int = 50
    eval_examples: int = 128
    threads: int = 1


@dataclass
class LookupResult:
    """Outcome of `train_lookup`: exact-match accuracy of the value tokens with the true and an unrelated context,
    on 256 fresh examples read through ``llm.forward(window, context=...)`` (tree path) or `reference_injection`."""

    steps: int
    seconds: float
    final_loss: float
    acc_true: float
    acc_unrelated: float
    chance: float
    history: list[dict] = field(default_factory=list)
    #: with the true context: accuracy where the asked record's value state was injected / sampled away, and how often
    acc_kept: float = float("nan")
    acc_dropped: float = float("nan")
    kept_fraction: float = 1.0

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("steps", "seconds", "final_loss", "acc_true", "acc_unrelated", "chance",
                                             "acc_kept", "acc_dropped", "kept_fraction", "history")}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}  # JSON has no NaN


def base_model(task: LookupTask, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random LLaMA (4 layers, width 64, 4 heads of 16, 2 KV heads) for ``task``'s vocabulary."""
    kw = {"vocab_size": task.vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}
    return tiny_model("llama", seed, **{**kw, **overrides})


def lookup_model(task: LookupTask, config: SharedCtxConfig, *, seed: int = 0, **overrides) -> SharedLLM:
    """A SharedLLM over `base_model` (its base frozen, as SharedLLM leaves it; `train_lookup` may unfreeze it)."""
    return SharedLLM.from_model(base_model(task, seed=seed, **overrides), None, config=config)


def batch_injection(llm: SharedLLM, contexts: torch.Tensor) -> Injection:
    """The injection of each row's context through the library's tree path (walk, one lower pass per node, sampling,
    chunk positions) for all rows at once: the rows, laid end to end, make one document whose chunks never straddle
    two rows; ``select`` walks it (equal-length nodes share a lower pass) and ``assemble_injection`` splits it back.
    Equals ``prepare_injection`` row by row under a policy that ignores the query (``right``, ``left``)."""
    batch, length = contexts.shape
    if length % llm.config.chunk_size:
        raise ValueError("each context must be a whole number of chunks")
    per_row = length // llm.config.chunk_size
    rows: list[list] = [[] for _ in range(batch)]
    for node in llm.select(llm.context_tree(contexts.reshape(-1)), None):
        rows[node.chunk // per_row].append(node)  # chunk positions are ranks within a row: 0..per_row-1
    return llm.assemble_injection(rows)


def reference_injection(llm: SharedLLM, contexts: torch.Tensor) -> Injection:
    """Plain cross-attention over the same lower-layer states without the tree: the whole context in one lower pass
    (positions ``0..L-1``), every state kept, no chunk positions."""
    keys, values, _ = llm.encoder.run(contexts, llm.config.injection_layers)
    return Injection(keys=list(keys), values=list(values), key_pos=None, query_pos=torch.zeros(contexts.shape[0], dtype=torch.long))


def shuffled_keys(seed: int = 0) -> InjectionHook:
    """A broken-on-purpose control: each call puts a row's injected keys in another order than its values (fresh at
    every call), so no key -> value binding survives. A mechanism that still "reads" under it is not reading."""
    g = torch.Generator().manual_seed(seed)

    def hook(injection: Injection) -> Injection:
        perm = torch.randperm(injection.n_states, generator=g)
        injection.keys = [k[:, :, perm] for k in injection.keys]
        return injection

    return hook


def _inject(llm: SharedLLM, contexts: torch.Tensor, path: str, hook: InjectionHook | None) -> Injection:
    inj = reference_injection(llm, contexts) if path == "reference" else batch_injection(llm, contexts)
    return hook(inj) if hook is not None else inj


def kept_positions(llm: SharedLLM, injection: Injection, length: int) -> torch.Tensor:
    """``(B, length)`` bool: the context tokens whose states the injection holds (nodes sampled down to ``node_keep``).
    Rows laid end to end (`batch_injection`) are folded back by ``length``."""
    kept = torch.zeros(len(injection.nodes), length, dtype=torch.bool)
    for row, nodes in enumerate(injection.nodes):
        for n in nodes:
            idx = torch.tensor(sample_indices(n.end - n.start, llm.config.node_keep, llm.config.sampling))
            kept[row, (n.start + idx) % length] = True
    return kept


@torch.no_grad()
def _score(task: LookupTask, read: Callable, examples: int, seed: int) -> dict[str, float]:
    """Accuracies of ``read(context, batch) -> (window logits, (B, L) kept mask or None)`` on fresh examples."""
    gen = torch.Generator().manual_seed(seed)
    counts = range(task.chunks[0], task.chunks[1] + 1)
    hits = {"true": [0, 0], "unrelated": [0, 0], "kept": [0, 0], "dropped": [0, 0]}
    for n_chunks in counts:  # as many examples for each chunk count
        b = task.sample(max(1, examples // len(counts)), n_chunks, gen)
        for name, ctx in (("true", b.context), ("unrelated", b.unrelated)):
            logits, kept = read(ctx, b)
            correct = logits[:, :-1].argmax(-1)[:, 1::2] == b.window[:, 2::2]
            parts = [(name, torch.ones_like(correct))]
            if name == "true":
                kept = torch.ones_like(correct) if kept is None else kept.gather(1, b.position)
                parts += [("kept", kept), ("dropped", ~kept)]
            for part, mask in parts:
                hits[part][0] += int(correct[mask].sum())
                hits[part][1] += int(mask.sum())
    out = {k: (h / n if n else float("nan")) for k, (h, n) in hits.items()}
    out["kept_fraction"] = hits["kept"][1] / max(1, hits["true"][1])
    return out


def evaluate(llm: SharedLLM, task: LookupTask, *, examples: int = 128, seed: int = 1234, path: str = "tree",
             public: bool = False, hook: InjectionHook | None = None) -> dict[str, float]:
    """Accuracy with the true and with an unrelated context on fresh examples and, with the true context, split by
    whether the state of the asked record's value was injected (``kept``) or sampled away (``dropped``; NaN when none
    was). ``public`` builds the tree path's injections with ``llm.prepare_injection(one context per row, window)``,
    as ``llm.forward(window, context=...)`` does."""

    def read(ctx, b):
        if public and path == "tree":
            inj = llm.prepare_injection(list(ctx), b.window)
            inj = hook(inj) if hook is not None else inj
        else:
            inj = _inject(llm, ctx, path, hook)
        return llm(b.window, injection=inj).logits, kept_positions(llm, inj, ctx.shape[1]) if inj.nodes else None

    was_training = llm.training
    llm.eval()
    try:
        return _score(task, read, examples, seed)
    finally:
        llm.train(was_training)


def _fit(model: torch.nn.Module, groups: list[dict], loss_of: Callable, evaluate_at: Callable, task: LookupTask,
         cfg: LookupTrainConfig, log: Callable | None) -> LookupResult:
    """The loop shared by `train_lookup` and `train_in_context`: AdamW on ``groups``, then a final evaluation."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    try:
        while len(losses) < cfg.steps:
            b = task.sample(cfg.batch_size, int(torch.randint(task.chunks[0], task.chunks[1] + 1, (1,), generator=gen)), gen)
            loss = loss_of(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if len(losses) % cfg.eval_every == 0 or len(losses) == cfg.steps:
                acc, tail = evaluate_at(cfg.eval_examples, 1234, False), losses[-cfg.eval_every :]
                history.append({"step": len(losses), "seconds": round(time.perf_counter() - t0, 2), "loss": round(sum(tail) / len(tail), 4),
                                "acc_true": round(acc["true"], 4), "acc_unrelated": round(acc["unrelated"], 4)})
                if log is not None:
                    log(history[-1])
        seconds = time.perf_counter() - t0
        final = evaluate_at(256, 4321, True)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    tail = losses[-20:] or [float("nan")]
    r = lambda x: round(x, 4)
    return LookupResult(len(losses), round(seconds, 2), r(sum(tail) / len(tail)), r(final["true"]), r(final["unrelated"]), task.chance,
                        history, r(final["kept"]), r(final["dropped"]), r(final["kept_fraction"]))


def train_lookup(llm: SharedLLM, task: LookupTask, cfg: LookupTrainConfig, *, hook: InjectionHook | None = None,
                 log: Callable[[dict], None] | None = None) -> LookupResult:
    """Train ``llm`` on ``task`` through the injection and evaluate it; ``hook`` edits every injection (tests break the
    mechanism with it). The final evaluation of the tree path goes through ``prepare_injection``."""
    adapter = dict(llm.adapter_named_parameters())
    for p in llm.base.parameters():  # the base (which holds the attached blocks) is trained or frozen as a whole
        p.requires_grad_(cfg.train_base)
    for p in adapter.values():
        p.requires_grad_(True)
    for slot in cfg.zero_gates:
        with torch.no_grad():
            llm.injection[slot].gate.zero_()
        llm.injection[slot].gate.requires_grad_(False)
    gates = [p for n, p in adapter.items() if n.endswith("gate") and p.requires_grad]
    others = [p for p in llm.parameters() if p.requires_grad and all(p is not g for g in gates)]
    groups = [{"params": others, "lr": cfg.lr}, {"params": gates, "lr": cfg.gate_lr}]
    loss_of = lambda b: llm(b.window, injection=_inject(llm, b.context, cfg.path, hook), labels=b.labels).loss
    evaluate_at = lambda n, seed, final: evaluate(llm, task, examples=n, seed=seed, path=cfg.path, public=final, hook=hook)
    return _fit(llm, groups, loss_of, evaluate_at, task, cfg, log)


def train_in_context(model: torch.nn.Module, task: LookupTask, cfg: LookupTrainConfig, *,
                     log: Callable[[dict], None] | None = None) -> LookupResult:
    """The baseline without injection: train the base ``model`` (every parameter) to read ``[context ; window]`` with
    full attention, with the same data, optimiser and evaluation as `train_lookup`."""

    def joined(ctx: torch.Tensor, b: LookupBatch) -> torch.Tensor:
        return torch.cat([ctx, b.window], 1)

    def loss_of(b: LookupBatch) -> torch.Tensor:
        return model(input_ids=joined(b.context, b), labels=torch.cat([torch.full_like(b.context, IGNORE), b.labels], 1)).loss

    def evaluate_at(n: int, seed: int, final: bool) -> dict[str, float]:
        model.eval()
        try:  # the logits over the window's positions, aligned as a window-only forward's
            return _score(task, lambda ctx, b: (model(input_ids=joined(ctx, b)).logits[:, ctx.shape[1] :], None), n, seed)
        finally:
            model.train()

    for p in model.parameters():
        p.requires_grad_(True)
    return _fit(model, [{"params": list(model.parameters()), "lr": cfg.lr}], loss_of, evaluate_at, task, cfg, log)
