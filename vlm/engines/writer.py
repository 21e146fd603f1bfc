"""The background writer: results are written (Jinja reports, plotly charts, JSON) on a thread, so the
encoder loop never waits on them.

A bounded queue keeps memory flat (a slow disk slows the producer instead of piling up results); the
first error in the writer stops the run: it is raised in the producing thread at the next `submit`
or at `close`, never swallowed.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

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
