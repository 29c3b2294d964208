"""Decoding with injected states held fixed: prefill, one token at a time, sampling, stop strings, streaming.

`stream_completion` answers one prompt (streaming), `complete_batch` several in one batched prefill and decoding
loop; both drive one `RowDecoder` per answer. `SharedLLM.stream` / `complete` / `complete_batch` call these, and
`ContextIndex` too. What an answer cost travels as `AnswerStats` and `Timings`, serialised by `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_STOP_ON_REPEAT
from .injection import Injection

#: a `sharedctx.SharedLLM` (not imported here: model.py imports this module)
SharedLLM = Any

__all__ = [
    "SamplingOptions",
    "SAMPLING_FIELDS",
    "sample_next",
    "StopMatcher",
    "banned_tokens",
    "RowDecoder",
    "AnswerStats",
    "Timings",
    "Completion",
    "CompletionStream",
    "stream_completion",
    "complete_batch",
    "chat_prompt_ids",
    "prompt_ids",
    "eos_ids",
]


@dataclass
class SamplingOptions:
    """How the next token is drawn: greedy when ``temperature == 0``.

    Two guards against a small model looping (0 turns either off; ``stop_on_repeat`` is on by default, in the
    CLI as in the API, ``no_repeat_ngram_size`` off):

    - ``no_repeat_ngram_size = n`` never draws a token that would repeat an ``n``-gram the answer already holds
      (the answer's own tokens, not the prompt's, so quoting the question or the context stays possible);
    - ``stop_on_repeat = n`` ends the answer when its last ``n`` tokens repeat ``n`` tokens it already holds, and
      drops that repeat: the answer keeps what came before it. The text of the latest ``n - 1`` tokens is held
      back while streaming, so nothing dropped was ever released.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    no_repeat_ngram_size: int = 0
    stop_on_repeat: int = DEFAULT_STOP_ON_REPEAT

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("no_repeat_ngram_size", "stop_on_repeat"):
            n = getattr(self, name)
            if n < 0 or n == 1:
                raise ValueError(f"{name} must be 0 (off) or an n-gram length >= 2, got {n}")


#: the options a generation call takes for sampling (the fields of `SamplingOptions`)
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingOptions))


def sample_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """``logits (B, V) -> (B,)`` next token ids."""
    if opts.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > opts.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class StopMatcher:
    """Turns a growing decoded text into safe-to-emit deltas, holding back what may begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.emitted = 0
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """The new text to emit given the whole decoded ``text`` so far; sets `stopped` at a stop string."""
        cut = len(text)
        for s in self.stops:
            at = text.find(s)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        safe = cut if (self.stopped or final) else max(self.emitted, cut - self._partial(text[:cut]))
        if not (self.stopped or final):
            while safe > self.emitted and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
                safe -= 1
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def banned_tokens(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an ``n``-gram already in ``generated`` (its last ``n - 1`` tokens as prefix)."""
    if n < 1 or len(generated) < n - 1:
        return []
    prefix = tuple(generated[len(generated) - (n - 1) :])
    return sorted({generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i : i + n - 1]) == prefix})


def _repeats_tail(generated: Sequence[int], n: int) -> bool:
    """Whether the last ``n`` tokens of ``generated`` occur earlier in it (possibly overlapping the tail)."""
    if len(generated) <= n:
        return False
    tail = list(generated[-n:])
    return any(list(generated[i : i + n]) == tail for i in range(len(generated) - n))


class RowDecoder:
    """One answer's decoding state: sampling, end of sequence, ``max_new_tokens``, stop strings and the text
    released so far. `SharedLLM.stream` drives one; `SharedLLM.complete_batch` one per batch row.

    ``push(logits (1, V))`` samples the next token and returns the text it releases (held back while it may begin
    a stop string, and for the latest ``stop_on_repeat - 1`` tokens); `done` tells when the answer has ended
    (`repeated` when the repeat guard ended it). ``finish()`` returns the text still held back.
    """

    def __init__(self, opts: SamplingOptions, eos_ids: set[int], tokenizer: Any, generator: torch.Generator | None) -> None:
        self.opts, self.eos_ids, self.tokenizer, self.generator = opts, eos_ids, tokenizer, generator
        self.matcher = StopMatcher(opts.stop)
        self.generated: list[int] = []
        self.done = opts.max_new_tokens == 0
        self.repeated = False
        self.first_token_at: float | None = None

    def push(self, logits: torch.Tensor) -> str:
        n_ban = self.opts.no_repeat_ngram_size
        banned = banned_tokens(self.generated, n_ban) if n_ban else []
        if banned:
            logits = logits.clone()
            logits[..., banned] = float("-inf")
        tid = int(sample_next(logits, self.opts, self.generator)[0])
        if tid in self.eos_ids:
            self.done = True
            return ""
        self.generated.append(tid)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        n_rep = self.opts.stop_on_repeat
        if n_rep and _repeats_tail(self.generated, n_rep):
            del self.generated[-n_rep:]  # the repeat is dropped; finish() releases what came before it
            self.done = self.repeated = True
            return ""
        delta = ""
        if self.tokenizer is not None:
            shown = self.generated[: len(self.generated) - (n_rep - 1)] if n_rep else self.generated
            delta = self.matcher.feed(self.tokenizer.decode(shown, skip_special_tokens=True))
        self.done = self.matcher.stopped or len(self.generated) >= self.opts.max_new_tokens
        return delta

    def finish(self) -> str:
        if self.tokenizer is None or self.matcher.stopped:
            return ""
        return self.matcher.feed(self.tokenizer.decode(self.generated, skip_special_tokens=True), final=True)


# ---------------------------------------------------------------------- prompts
def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, ready for the assistant's turn; a tokenizer
    without a template gets a plain ``Role: text`` transcript."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    lines = (f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return [int(i) for i in tokenizer("\n".join(lines) + "\nAssistant:", add_special_tokens=True)["input_ids"]]


def prompt_ids(tokenizer: Any, prompt: str | Sequence[int] | torch.Tensor, *, chat: bool = True, system: str | None = None) -> torch.Tensor:
    """``(1, T)`` token ids of ``prompt``: text as a user turn of the chat template (``chat``, with an optional
    ``system`` message) or as plain text; token ids as given. An empty prompt is refused."""
    if isinstance(prompt, str):
        if chat and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids: Any = chat_prompt_ids(tokenizer, messages)
        else:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = prompt
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    return ids


def eos_ids(*sources: Any) -> set[int]:
    """Token ids that end an answer: every ``eos_token_id`` (an id or a list) of the given configs / tokenizer."""
    ids: set[int] = set()
    for src in sources:
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# ---------------------------------------------------------------------- what an answer cost
class _FieldMapping(Mapping):
    """Read-only mapping view of a dataclass's fields, so ``stats["prompt_tokens"]`` reads as ``stats.prompt_tokens``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


@dataclass(eq=True)
class Timings(_FieldMapping):
    """Seconds spent on one answer. ``first_token_s`` and ``total_s`` count from the call (retrieval included)."""

    retrieve_s: float = 0.0  # ranking chunks and walking trees (ContextIndex)
    inject_s: float = 0.0  # building the injected states (selection, encoding on the fly)
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(eq=True)
class AnswerStats(_FieldMapping):
    """What one answer read and produced; the same type for `SharedLLM` completions and `ContextIndex` answers
    (fields an answer has no use for stay at their defaults)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    injected_states: int = 0
    #: provenance of the injected nodes (document order)
    injected_nodes: list = field(default_factory=list)
    batch_size: int = 1
    #: a single context tree: its tokens and chunks
    context_tokens: int = 0
    chunks: int = 0
    #: a ContextIndex answer: how it was read and what retrieval touched
    mode: str | None = None
    documents: int = 0
    chunks_selected: int = 0
    chunks_encoded: int = 0
    chunks_cached: int = 0
    text_passages_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["injected_nodes"] = [dataclasses.asdict(n) if dataclasses.is_dataclass(n) else dict(n) for n in self.injected_nodes]
        return out


@dataclass
class Completion:
    """A generated answer with what it cost."""

    text: str
    token_ids: list[int]
    stats: AnswerStats = field(default_factory=AnswerStats)
    timings: Timings = field(default_factory=Timings)

    def report(self) -> dict[str, Any]:
        """``stats`` as a plain dict with ``token_ids`` and ``timings``: what a ``stats=`` dict of a streaming call receives."""
        return {**self.stats.to_dict(), "token_ids": list(self.token_ids), "timings": self.timings.to_dict()}


def _timings(t0: float, t_inject: float, t_prefill: float, first_token_at: float | None, end: float, n_tokens: int) -> Timings:
    return Timings(
        inject_s=t_inject - t0,
        prefill_s=t_prefill - t_inject,
        first_token_s=(first_token_at or end) - t0,
        decode_s=end - t_prefill,
        total_s=end - t0,
        tokens_per_s=n_tokens / max(end - t_prefill, 1e-9),
    )


def _injected_nodes(injection: Injection | None) -> list:
    return [] if injection is None or not injection.nodes else list(injection.nodes[0])


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ---------------------------------------------------------------------- one answer, streamed
class CompletionStream:
    """The text of one answer as it is decoded (iterate it); once exhausted, `completion` holds the whole
    `Completion` with its statistics and timings."""

    def __init__(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)


def stream_completion(
    llm: SharedLLM,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    context: Any = None,
    injection: Injection | None = None,
    options: SamplingOptions,
    chat: bool = True,
    system: str | None = None,
) -> CompletionStream:
    """Decode the answer to ``prompt`` reading ``context`` (selected and injected here) or a ready ``injection``."""
    if injection is not None and context is not None:
        raise ValueError("give either context= or injection=, not both")
    result = CompletionStream(iter(()))

    def run() -> Iterator[str]:
        nonlocal injection
        t0 = time.perf_counter()
        ids = llm.prompt_ids(prompt, chat=chat, system=system)
        llm.check_length(ids.shape[1] + options.max_new_tokens)
        tree = None
        if context is not None:
            tree = llm.context_tree(context)
            with torch.no_grad():
                injection = llm.prepare_injection(tree, ids, query_text=prompt if isinstance(prompt, str) else None)
        t_inject = time.perf_counter()
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        row = RowDecoder(options, llm.eos_ids(), llm.tokenizer, generator)
        parts: list[str] = []
        with torch.no_grad():
            out = llm.forward(ids, injection=injection, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter()
            while not row.done:
                delta = row.push(out.logits[:, -1])
                if delta:
                    parts.append(delta)
                    yield delta
                if row.done:
                    break
                token = torch.tensor([[row.generated[-1]]], device=llm.device)
                out = llm.forward(token, injection=injection, past_key_values=_output_cache(out), use_cache=True, logits_to_keep=1)
            tail = row.finish()
            if tail:
                parts.append(tail)
                yield tail
        end = time.perf_counter()
        stats = AnswerStats(
            prompt_tokens=int(ids.shape[1]),
            generated_tokens=len(row.generated),
            injected_states=0 if injection is None else injection.n_states,
            injected_nodes=_injected_nodes(injection),
            context_tokens=0 if tree is None else tree.n_tokens,
            chunks=0 if tree is None else tree.n_chunks,
        )
        result.completion = Completion(
            text="".join(parts), token_ids=row.generated, stats=stats,
            timings=_timings(t0, t_inject, t_prefill, row.first_token_at, end, len(row.generated)),
        )

    result._deltas = run()
    return result


# ---------------------------------------------------------------------- several answers, batched
def complete_batch(
    llm: SharedLLM,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    *,
    injections: Sequence[Injection | None] | None = None,
    options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    chat: bool = True,
    system: str | None = None,
) -> list[Completion]:
    """Answer several prompts in one batched prefill and one batched decoding loop (see `SharedLLM.complete_batch`)."""
    n = len(prompts)
    if n == 0:
        return []
    injections = [None] * n if injections is None else list(injections)
    if len(injections) != n:
        raise ValueError(f"got {len(injections)} injections for {n} prompts")
    if options is None or isinstance(options, dict):
        options = [dict(options or {})] * n
    if len(options) != n:
        raise ValueError(f"got {len(options)} option dicts for {n} prompts")
    opts = []
    for o in options:
        unknown = sorted(set(o) - SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown generation options {unknown}; known: {sorted(SAMPLING_FIELDS)}")
        opts.append(SamplingOptions(**{"max_new_tokens": 256, **o}))
    t0 = time.perf_counter()
    rows = [llm.prompt_ids(p, chat=chat, system=system)[0] for p in prompts]
    for ids, o in zip(rows, opts):
        llm.check_length(ids.numel() + o.max_new_tokens)
    tok = llm.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    eos = llm.eos_ids()
    pad = int(pad if pad is not None else (min(eos) if eos else 0))
    width = max(r.numel() for r in rows)
    input_ids = torch.full((n, width), pad, dtype=torch.long, device=llm.device)
    mask = torch.zeros(n, width, dtype=torch.long, device=llm.device)
    for b, r in enumerate(rows):
        input_ids[b, width - r.numel() :] = r
        mask[b, width - r.numel() :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    injection = Injection.stack(injections)
    decoders = [RowDecoder(o, eos, tok, torch.Generator().manual_seed(o.seed) if o.seed is not None else None) for o in opts]
    texts = [""] * n
    end_at: list[float | None] = [None] * n
    t_inject = time.perf_counter()
    with torch.no_grad():
        out = llm.forward(input_ids, attention_mask=mask, position_ids=positions, injection=injection, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter()
        while not all(d.done for d in decoders):
            logits = out.logits[:, -1]
            step_tokens = torch.full((n, 1), pad, dtype=torch.long, device=llm.device)
            for b, d in enumerate(decoders):
                if d.done:
                    continue
                texts[b] += d.push(logits[b : b + 1])
                if not d.done:
                    step_tokens[b, 0] = d.generated[-1]
            now = time.perf_counter()
            for b, d in enumerate(decoders):
                if d.done and end_at[b] is None:
                    end_at[b] = now
            if all(d.done for d in decoders):
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = llm.forward(
                step_tokens, attention_mask=mask, position_ids=positions, injection=injection,
                past_key_values=_output_cache(out), use_cache=True, logits_to_keep=1,
            )  # rows that have ended are carried along; what they read is never used
    end = time.perf_counter()
    results = []
    for b, d in enumerate(decoders):
        texts[b] += d.finish()
        stats = AnswerStats(
            prompt_tokens=int(rows[b].numel()),
            generated_tokens=len(d.generated),
            injected_states=0 if injections[b] is None else injections[b].n_states,
            injected_nodes=_injected_nodes(injections[b]),
            batch_size=n,
        )
        timings = _timings(t0, t_inject, t_prefill, d.first_token_at, end_at[b] or end, len(d.generated))
        results.append(Completion(text=texts[b], token_ids=d.generated, stats=stats, timings=timings))
    return results
