"""Decoding with injected states held fixed: prefill, one token at a time, sampling, stop strings, streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch

__all__ = ["SamplingOptions", "SAMPLING_FIELDS", "sample_next", "StopMatcher", "RowDecoder", "iterate_in_thread", "MicroBatcher"]


@dataclass
class SamplingOptions:
    """How the next token is drawn: greedy when ``temperature == 0``."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

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


class RowDecoder:
    """One answer's decoding state: sampling, end of sequence, ``max_new_tokens``, stop strings and the text
    released so far. `SharedLLM.stream` drives one; `SharedLLM.complete_batch` one per batch row.

    ``push(logits (1, V))`` samples the next token and returns the text it releases (held back while it may begin
    a stop string); `done` tells when the answer has ended. ``finish()`` returns the text still held back.
    """

    def __init__(self, opts: SamplingOptions, eos_ids: set[int], tokenizer: Any, generator: torch.Generator | None) -> None:
        self.opts, self.eos_ids, self.tokenizer, self.generator = opts, eos_ids, tokenizer, generator
        self.matcher = StopMatcher(opts.stop)
        self.generated: list[int] = []
        self.done = opts.max_new_tokens == 0
        self.first_token_at: float | None = None

    def push(self, logits: torch.Tensor) -> str:
        tid = int(sample_next(logits, self.opts, self.generator)[0])
        if tid in self.eos_ids:
            self.done = True
            return ""
        self.generated.append(tid)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        delta = ""
        if self.tokenizer is not None:
            delta = self.matcher.feed(self.tokenizer.decode(self.generated, skip_special_tokens=True))
        self.done = self.matcher.stopped or len(self.generated) >= self.opts.max_new_tokens
        return delta

    def finish(self) -> str:
        if self.tokenizer is None or self.matcher.stopped:
            return ""
        return self.matcher.feed(self.tokenizer.decode(self.generated, skip_special_tokens=True), final=True)


async def iterate_in_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive the blocking iterator ``make()`` (e.g. `SharedLLM.stream`) in a worker thread and yield its items in
    the running event loop; never blocks the loop and never calls ``asyncio.run``.

    An exception in the worker is re-raised here; when the consumer stops early, the worker stops at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed: nobody listens any more
            cancelled.set()

    def produce() -> None:
        try:
            for item in make():
                if cancelled.is_set():
                    return
                put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(("error", exc))
        else:
            put(("done", None))

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            kind, item = await queue.get()
            if kind == "error":
                raise item
            if kind == "done":
                return
            yield item
    finally:
        cancelled.set()
        if worker.done():
            worker.result()


class MicroBatcher:
    """Runs items submitted from many threads in batches, one batch at a time, in one worker thread.

    ``run(items) -> results`` (same length and order) does the batched work, e.g. one forward for several
    queries. A request arriving at an idle worker waits at most ``max_wait_s`` for company, then runs; requests
    arriving while a batch runs queue up and form the next batch (at most ``max_batch`` items). When a batch
    fails, each of its items is run alone, so an error reaches only the caller whose item caused it.
    ``stats`` counts batches, items and the largest batch. The worker thread starts with the first request and
    ends after ``idle_s`` seconds without one (so a forgotten batcher holds no thread), starting again when needed.
    """

    def __init__(
        self, run: Callable[[list[Any]], list[Any]], *, max_batch: int = 8, max_wait_s: float = 0.002, idle_s: float = 10.0, name: str = "sharedctx-batcher"
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run, self.max_batch, self.max_wait_s, self.idle_s, self.name = run, max_batch, max_wait_s, idle_s, name
        self.stats = {"batches": 0, "items": 0, "largest": 0}
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False

    def submit(self, item: Any) -> Any:
        """Run ``item`` in the next batch and return its result (or raise its error); blocks until then."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._worker.start()
            self._queue.put((item, future))
        return future.result()

    def close(self) -> None:
        """Finish what was submitted, then stop the worker; later submissions raise."""
        with self._lock:
            self._closed = True
            worker = self._worker
            self._queue.put(None)
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:  # submit() puts under this lock: nothing can arrive unseen between the check and the exit
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        self.stats["batches"] += 1
        self.stats["items"] += len(batch)
        self.stats["largest"] = max(self.stats["largest"], len(batch))
        self._execute(batch, isolate=len(batch) > 1)

    def _execute(self, batch: list[tuple[Any, Future]], *, isolate: bool) -> None:
        """Run ``batch`` and settle its futures; when it fails and ``isolate``, run each item alone to find whose
        item fails, so only that caller gets the error."""
        items = [item for item, _ in batch]
        try:
            results = self.run(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: run() returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to the callers
            for pair in batch:
                if isolate:
                    self._execute([pair], isolate=False)
                else:
                    pair[1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
