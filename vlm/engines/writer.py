"""The background writers: results are written (Jinja reports, chart specs, JSON) on a thread
(`BackgroundWriter`) or a child process (`ProcessWriter`, what `vlm-xray batch` uses where fork
exists), so the encoder loop does not wait on them.

A bounded queue keeps memory flat (a slow disk slows the producer instead of piling up results); the
first error in the writer stops the run: it is raised in the producing thread at the next `submit`
or at `close`, never swallowed.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

_DONE = object()


class BackgroundWriter:
    def __init__(self, write: Callable[[object], None], max_pending: int = 64, name: str = "vlm-writer"):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain after a failure; the error is raised in the producer
            try:
                self._write(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer thread, see _raise
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item) -> None:
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until everything submitted is written; raises the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None:
            self.close()
        else:  # the producer failed: stop the thread, keep the producer's exception
            self._queue.put(_DONE)
            self._thread.join()
        return False


def _exit_with_parent(parent: int) -> None:
    """In the writer's child: exit when the batch process is gone (killed: SIGKILL leaves no chance to
    stop the child, and a forked child holds both ends of its task pipe, so it would wait forever)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="vlm-writer-watchdog", daemon=True).start()


class ProcessWriter:
    """The same contract as `BackgroundWriter`, with the work done in a forked child process: report
    rendering (Jinja, chart specs, JSON, two atomic files: ~2 ms of pure Python a report) then runs
    beside the encoder loop instead of taking turns with it on this process's GIL.

    `work(*args)` runs in the child; `done(item, value)` runs here, in submission order, with what it
    returned (an item submitted without args only goes through `done`, with None, in its turn). At most `max_pending` submissions are in flight (memory stays flat; a slow disk slows the
    producer). The child's first exception is raised here at the next `submit` or at `close`, never
    swallowed. Forked, so the child sees this process's state at the time the writer is made (made
    before the engine starts its own workers and threads). `available()`: fork exists (Linux)."""

    def __init__(self, work: Callable, done: Callable[[object, object], None], max_pending: int = 32):
        import multiprocessing
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_exit_with_parent, initargs=(os.getpid(),))
        self._work, self._done, self._max = work, done, max(1, max_pending)
        self._pending: deque = deque()

    @staticmethod
    def available() -> bool:
        import multiprocessing
        import sys

        return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()

    def submit(self, item, *args) -> None:
        self._pending.append((item, self._pool.submit(self._work, *args) if args else None))
        self._reap(wait=False)

    def _reap(self, wait: bool) -> None:
        while self._pending and (wait or len(self._pending) > self._max or self._pending[0][1] is None
                                 or self._pending[0][1].done()):
            item, future = self._pending.popleft()
            self._done(item, None if future is None else future.result())  # the child's exception is raised here

    def close(self) -> None:
        self._reap(wait=True)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ProcessWriter":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None:
            self.close()
            return False
        # the producer failed (or was interrupted): finish what was submitted, as the thread writer does,
        # so a resumed run finds those reports; the producer's exception is the one raised
        try:
            self._reap(wait=True)
        except Exception as e:  # noqa: BLE001 - secondary to the producer's exception, which propagates
            logger.error("report writer failed while stopping after an error: %s: %s", type(e).__name__, e)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return False
