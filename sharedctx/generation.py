"""Decoding with injected states held fixed: prefill, one token at a time, sampling, stop strings, streaming.

A prompt becomes a `GenerationRequest` once (`make_request`: tokenised, checked against the window, with the
injected states it reads and its `SamplingOptions`); `decode` is the one loop that answers requests, one or a batch,
driving a `RowDecoder` per row: `stream` runs it for one request, `complete` for several. The model is anything
that is a `DecodingModel` (`SharedLLM` is). What an answer cost travels as `sharedctx.stats` types.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Protocol, Sequence

import torch

from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_STOP_ON_REPEAT
from .injection import Injection
from .stats import AnswerStats, Completion, Timings

__all__ = [
    "SamplingOptions",
    "SAMPLING_FIELDS",
    "sample_next",
    "StopMatcher",
    "banned_tokens",
    "RowDecoder",
    "CompletionStream",
    "DecodingModel",
    "GenerationRequest",
    "make_request",
    "sampling_options",
    "decode",
    "stream",
    "complete",
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


def _injected_nodes(injection: Injection | None) -> list:
    return [] if injection is None or not injection.nodes else list(injection.nodes[0])


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ---------------------------------------------------------------------- the model and the request
class DecodingModel(Protocol):
    """What decoding needs of a model (`sharedctx.SharedLLM` is one): its tokenizer and device, a ``forward`` that
    reads injected states and a key/value cache, the token ids of a prompt, the window check and the end ids."""

    tokenizer: Any

    @property
    def device(self) -> torch.device: ...

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, injection: Injection | None = None,
                past_key_values: Any = None, use_cache: bool = False, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None) -> Any: ...

    def prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor, *, chat: bool = True, system: str | None = None) -> torch.Tensor: ...

    def check_length(self, length: int) -> None: ...

    def eos_ids(self) -> set[int]: ...


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt ready to decode, built and checked once (`make_request`): its token ids, the injected states it
    reads and its sampling options. `decode` answers it alone or in a batch with others, by the same loop."""

    ids: torch.Tensor  # (T,) prompt token ids, on the model's device
    injection: Injection | None = None  # one row, or None: reads nothing
    options: SamplingOptions = field(default_factory=SamplingOptions)
    prepare_s: float = 0.0  # seconds spent making it (tokenising, selecting and injecting): the answer's inject_s
    context_tokens: int = 0  # a single context tree read: its tokens and chunks (reported in the stats)
    chunks: int = 0


def make_request(
    model: DecodingModel,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    injection: Injection | None = None,
    options: SamplingOptions | None = None,
    chat: bool = True,
    system: str | None = None,
) -> GenerationRequest:
    """Tokenise ``prompt`` (text in the chat template, or ids as given) and check that it and the tokens to generate
    fit the model's window (`PromptTooLongError`); the only place a prompt is tokenised and checked."""
    t0 = time.perf_counter()
    options = options or SamplingOptions()
    ids = model.prompt_ids(prompt, chat=chat, system=system)[0]
    model.check_length(ids.numel() + options.max_new_tokens)
    return GenerationRequest(ids, injection, options, time.perf_counter() - t0)


def sampling_options(options: Mapping[str, Any], *, what: str = "generation options") -> SamplingOptions:
    """`SamplingOptions` from a mapping of its fields; an unknown key raises TypeError (a typo is never dropped)."""
    unknown = sorted(set(options) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown {what} {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    return SamplingOptions(**options)


# ---------------------------------------------------------------------- THE decoding loop
def decode(model: DecodingModel, requests: Sequence[GenerationRequest]) -> Generator[tuple[int, str], None, list[Completion]]:
    """Answer ``requests`` in one prefill and one decoding loop: yields ``(row, text)`` as each row releases text
    and returns one `Completion` per request. Serves `stream` (one row), `complete` and every batch.

    Prompts of different lengths are left-padded and given explicit positions, so each row's answer is the one it
    gets alone, up to the floating-point order of batched sums. Decoding runs until every row has ended (end of
    sequence, a stop string, a repeat or its own ``max_new_tokens``); ended rows are carried along unread.
    """
    n = len(requests)
    if n == 0:
        return []
    t0 = time.perf_counter()
    device, tok, eos = model.device, model.tokenizer, model.eos_ids()
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = int(pad if pad is not None else (min(eos) if eos else 0))
    rows = [r.ids.to(device).reshape(-1) for r in requests]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    mask = positions = None
    if any(r.numel() != width for r in rows):  # padded rows: mask the padding and count positions from each row's start
        mask = torch.zeros(n, width, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            mask[b, width - r.numel() :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for b, r in enumerate(rows):
        input_ids[b, width - r.numel() :] = r
    injection = requests[0].injection if n == 1 else Injection.stack([r.injection for r in requests])
    decoders = [RowDecoder(r.options, eos, tok, None if r.options.seed is None else torch.Generator().manual_seed(r.options.seed)) for r in requests]
    parts: list[list[str]] = [[] for _ in range(n)]
    end_at: list[float | None] = [None] * n
    with torch.no_grad():
        out = model.forward(input_ids, attention_mask=mask, position_ids=positions, injection=injection, use_cache=True, logits_to_keep=1)
    t_prefill = time.perf_counter()
    while not all(d.done for d in decoders):
        logits = out.logits[:, -1]
        step = torch.full((n, 1), pad, dtype=torch.long, device=device)
        for b, d in enumerate(decoders):
            if d.done:
                continue
            delta = d.push(logits[b : b + 1])
            if d.done:
                delta += d.finish()
                end_at[b] = time.perf_counter()
            else:
                step[b, 0] = d.generated[-1]
            if delta:
                parts[b].append(delta)
                yield b, delta
        if all(d.done for d in decoders):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1  # type: ignore[index]
        with torch.no_grad():  # rows that have ended are carried along; what they read is never used
            out = model.forward(step, attention_mask=mask, position_ids=positions, injection=injection,
                                past_key_values=_output_cache(out), use_cache=True, logits_to_keep=1)
    end = time.perf_counter()
    done = []
    for b, (r, d) in enumerate(zip(requests, decoders)):
        stop = end_at[b] or end
        stats = AnswerStats(
            prompt_tokens=int(rows[b].numel()), generated_tokens=len(d.generated),
            injected_states=0 if r.injection is None else r.injection.n_states, injected_nodes=_injected_nodes(r.injection),
            batch_size=n, context_tokens=r.context_tokens, chunks=r.chunks,
        )
        timings = Timings(
            inject_s=r.prepare_s, prefill_s=t_prefill - t0, first_token_s=r.prepare_s + ((d.first_token_at or stop) - t0),
            decode_s=stop - t_prefill, total_s=r.prepare_s + (stop - t0), tokens_per_s=len(d.generated) / max(stop - t_prefill, 1e-9),
        )
        done.append(Completion(text="".join(parts[b]), token_ids=d.generated, stats=stats, timings=timings))
    return done


class CompletionStream:
    """The text of one answer as it is decoded (iterate it); once exhausted, `completion` holds the whole
    `Completion` with its statistics and timings."""

    def __init__(self, model: DecodingModel, request: GenerationRequest) -> None:
        self.request = request
        self.completion: Completion | None = None
        self._steps = decode(model, [request])

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._steps)[1]
        except StopIteration as end:
            if end.value is not None:
                self.completion = end.value[0]
            raise StopIteration from None


def stream(model: DecodingModel, request: GenerationRequest) -> CompletionStream:
    """Decode one request, yielding its text as it is released (`decode` with one row)."""
    return CompletionStream(model, request)


def complete(model: DecodingModel, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """Decode ``requests`` together and return their completions (`decode`, run to the end)."""
    steps = decode(model, requests)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def complete_batch(
    model: DecodingModel,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    *,
    injections: Sequence[Injection | None] | None = None,
    options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    chat: bool = True,
    system: str | None = None,
) -> list[Completion]:
    """Answer several prompts in one batch (see `SharedLLM.complete_batch`): a request per prompt, then `complete`."""
    n = len(prompts)
    injections = [None] * n if injections is None else list(injections)
    if len(injections) != n:
        raise ValueError(f"got {len(injections)} injections for {n} prompts")
    if options is None or isinstance(options, Mapping):
        options = [dict(options or {})] * n
    if len(options) != n:
        raise ValueError(f"got {len(options)} option dicts for {n} prompts")
    opts = [sampling_options(o) for o in options]
    return complete(model, [make_request(model, p, injection=i, options=o, chat=chat, system=system) for p, i, o in zip(prompts, injections, opts)])
