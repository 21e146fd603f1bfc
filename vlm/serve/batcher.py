"""The one model thread and its queue: micro-batching of concurrent encoder calls.

Requests never touch the model on the event loop. `submit_encode` queues one image's variant
tensors; the model thread takes every encode job waiting (up to `max_batch` images) and encodes
them in ONE forward pass, handing each request its own rows. `submit_call` queues any other model
work (heatmaps, the OOD check, building a scorer for new options), which runs alone, in arrival order.

When to stop gathering a batch (adaptive, so an idle server adds no wait to a lone request):
requests announce themselves with `arriving()` before their CPU work (decode, variants) and are
counted until they submit. The model thread waits -- at most `max_wait_s` after the batch's first
job -- only while such requests are on their way; with none announced it runs what it has at once.
Under load the queue fills while the encoder runs, so batches form without any waiting.

The queue is bounded: when `max_queue` jobs wait, `QueueFull` is raised at once (the API answers
503 with Retry-After) instead of letting requests pile up.

Batching does not change numbers: the encoder runs in eval mode, so each image's rows depend only
on its own tensors (tests/test_serve.py checks batched == single, bit for bit).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"model queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    kind: str  # "encode" | "call"
    payload: Any
    deliver: Callable[[Any, BaseException | None], None]  # called on the model thread with (result, error)
    queued_at: float = field(default_factory=time.perf_counter)


def _to_asyncio(future: asyncio.Future, loop: asyncio.AbstractEventLoop):
    def deliver(result, error) -> None:
        try:
            loop.call_soon_threadsafe(_resolve, future, result, error)
        except RuntimeError:  # the request's event loop is closed (client and server gone)
            logger.debug("dropped a result: its event loop is closed")
    return deliver


def _to_thread(future: concurrent.futures.Future):
    def deliver(result, error) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    return deliver


@dataclass
class _Arrival:
    submitted: bool = False


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    calls: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0
    waited_s: float = 0.0  # time the model thread spent waiting for announced requests

    def to_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "calls": self.calls,
                "largest_batch": self.largest_batch, "busy_s": round(self.busy_s, 3),
                "waited_s": round(self.waited_s, 3),
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
        self._jobs: deque[_Job | None] = deque()
        self._cond = threading.Condition()
        self._pending = 0  # jobs queued or running
        self._arriving = 0  # requests announced by `arriving()` that have not submitted yet
        self._seconds_per_job = 0.5  # running estimate, for Retry-After
        # The model thread holds the GIL in Python-level work (Grad-CAM, PNG encoding); a short switch
        # interval lets the event loop answer /healthz within milliseconds meanwhile.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._thread = threading.Thread(target=self._run, name="vlm-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @contextmanager
    def arriving(self) -> Iterator[_Arrival]:
        """Count a request as on its way to the model while the block runs (its decode): the model
        thread may wait for it to join the current batch. Submit inside the block with
        `submit_encode(payload, arrival)`, which uncounts it in the same step as it queues the job."""
        arrival = _Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                if not arrival.submitted:  # failed (e.g. undecodable): nothing more is coming from it
                    self._arriving -= 1
                    self._cond.notify_all()

    async def submit_encode(self, payload, arrival: _Arrival | None = None) -> Any:
        return await self._submit("encode", payload, arrival)

    async def submit_call(self, fn: Callable[[], Any]) -> Any:
        return await self._submit("call", fn)

    def call_blocking(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run fn on the model thread from a plain (non-async) thread and wait for its result: e.g.
        the start-up warm-up, whose memory must belong to the model thread that serves later."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(_Job("call", fn, _to_thread(future)), None)
        return future.result(timeout)

    async def _submit(self, kind: str, payload, arrival: _Arrival | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(_Job(kind, payload, _to_asyncio(future, loop)), arrival)
        return await future

    def _enqueue(self, job: _Job, arrival: _Arrival | None) -> None:
        with self._cond:
            if arrival is not None and not arrival.submitted:
                arrival.submitted = True
                self._arriving -= 1
            if self._pending >= self.max_queue:
                self._cond.notify_all()  # the model thread may be waiting for this request
                raise QueueFull(max(1, math.ceil(self._pending * self._seconds_per_job)))
            self._pending += 1
            self._jobs.append(job)
            self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ model thread

    def _run(self) -> None:
        while True:
            batch = self._next_work()
            if batch is None:
                return
            if batch[0].kind == "call":
                self._finish(batch, self._call, batch[0].payload)
            else:
                self._finish(batch, self._encode, [j.payload for j in batch])

    def _next_work(self) -> list[_Job] | None:
        """The next call job alone, or a batch of encode jobs; None at close."""
        with self._cond:
            while not self._jobs:
                self._cond.wait()
            first = self._jobs.popleft()
            if first is None:
                return None
            if first.kind == "call":
                return [first]
            batch, deadline, t0 = [first], time.perf_counter() + self.max_wait_s, time.perf_counter()
            while len(batch) < self.max_batch:
                if self._jobs:
                    if self._jobs[0] is None or self._jobs[0].kind != "encode":
                        break  # a call (or close) is next in line: it runs right after this batch
                    batch.append(self._jobs.popleft())
                    continue
                left = deadline - time.perf_counter()
                if self._arriving == 0 or left <= 0:
                    break  # nobody is on the way (or waited long enough): run what we have
                self._cond.wait(left)
            self.stats.waited_s += time.perf_counter() - t0
            return batch

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
        with self._cond:
            self._pending -= len(jobs)
        for i, job in enumerate(jobs):
            job.deliver(None if error else results[i], error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return  # the client went away; nothing to hand over
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
