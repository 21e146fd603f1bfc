"""The one model thread and its queue: micro-batching of concurrent encoder calls.

Requests never touch the model on the event loop. `submit_encode` queues one image's variant
tensors; the model thread takes the first waiting job, waits up to `max_wait_s` for more (up to
`max_batch` images), encodes them in ONE forward pass and hands each request its own rows.
`submit_call` queues any other model work (heatmaps, building a scorer for new options) which
runs alone, in arrival order. The queue is bounded: when `max_queue` jobs wait, `QueueFull` is
raised at once (the API answers 503 with Retry-After) instead of letting requests pile up.

Batching does not change numbers: the encoder runs in eval mode, so each image's rows depend only
on its own tensors (tests/test_serve.py checks batched == single, bit for bit).
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"model queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    kind: str  # "encode" | "call"
    payload: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    calls: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "calls": self.calls,
                "largest_batch": self.largest_batch, "busy_s": round(self.busy_s, 3),
                "mean_batch": round(self.images / self.batches, 3) if self.batches else None}


class MicroBatcher:
    """encode_batch(list of payloads) -> list of results (same order) runs on the model thread."""

    def __init__(self, encode_batch: Callable[[list], list], max_batch: int = 8, max_wait_s: float = 0.01,
                 max_queue: int = 32, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.encode_batch, self.max_batch, self.max_wait_s, self.max_queue = encode_batch, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._seconds_per_job = 0.5  # running estimate, for Retry-After
        # The model thread holds the GIL in Python-level work (Grad-CAM, PNG encoding); a short switch
        # interval lets the event loop answer /healthz within milliseconds meanwhile.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._thread = threading.Thread(target=self._run, name="vlm-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    async def submit_encode(self, payload) -> Any:
        return await self._submit("encode", payload)

    async def submit_call(self, fn: Callable[[], Any]) -> Any:
        return await self._submit("call", fn)

    async def _submit(self, kind: str, payload) -> Any:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(max(1, math.ceil(self._pending * self._seconds_per_job)))
            self._pending += 1
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, loop.create_future(), loop)
        self._jobs.put(job)
        return await job.future

    def close(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ model thread

    def _run(self) -> None:
        held: _Job | None = None
        while True:
            job = held or self._jobs.get()
            held = None
            if job is None:
                return
            if job.kind == "call":
                self._finish([job], self._call, job.payload)
                continue
            batch = [job]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                if nxt.kind != "encode":
                    held = nxt  # runs right after this batch
                    break
                batch.append(nxt)
            self._finish(batch, self._encode, [j.payload for j in batch])

    def _call(self, fn):
        self.stats.calls += 1
        return [fn()]

    def _encode(self, payloads):
        self.stats.batches += 1
        self.stats.images += len(payloads)
        self.stats.largest_batch = max(self.stats.largest_batch, len(payloads))
        if self.on_batch is not None:
            self.on_batch(len(payloads))
        return self.encode_batch(payloads)

    def _finish(self, jobs: list[_Job], fn, arg) -> None:
        start = time.perf_counter()
        try:
            results, error = fn(arg), None
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests, which answer with it
            results, error = None, e
        took = time.perf_counter() - start
        self.stats.busy_s += took
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (took / len(jobs))
        with self._lock:
            self._pending -= len(jobs)
        for i, job in enumerate(jobs):
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, None if error else results[i], error)
            except RuntimeError:  # the request's event loop is closed (client and server gone)
                logger.debug("dropped a result: its event loop is closed")


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return  # the client went away; nothing to hand over
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
