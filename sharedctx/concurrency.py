"""Concurrency helpers: micro-batching of requests from many threads into one batched forward, and driving a
blocking iterator (a streamed answer) from an asyncio event loop without blocking it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterator

__all__ = ["MicroBatcher", "iterate_in_thread"]


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
