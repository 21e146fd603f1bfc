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
import pickle
import queue
import select
import struct
import threading
import time
from collections import deque
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
    stop the child, and the processes forked from the batch after it - its decode workers - hold the
    write end of the task pipe, so the child could wait on it for a while)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="vlm-writer-watchdog", daemon=True).start()


_FRAME = struct.Struct("<Q")  # a frame on the writer's pipes: its length, then a pickle


def _frame(value) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def _write_frames(fd: int, frames) -> None:
    with os.fdopen(fd, "wb") as out:
        for value in frames:
            out.write(_frame(value))
            out.flush()


def _read_frames(fd: int):
    with os.fdopen(fd, "rb") as src:
        while len(head := src.read(_FRAME.size)) == _FRAME.size:
            yield pickle.loads(src.read(_FRAME.unpack(head)[0]))


def _child_main(work: Callable, tasks: int, results: int, parent_ends: tuple[int, int], parent: int) -> None:
    """The writer child: (True, work(*args)) or (False, its exception) for each task, in order, until the
    task pipe closes. Ctrl-C is the parent's to handle (it finishes what was submitted, then stops)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in parent_ends:
        os.close(fd)
    _exit_with_parent(parent)

    def outcomes():
        for args in _read_frames(tasks):
            try:
                yield True, work(*args)
            except BaseException as e:  # noqa: BLE001 - sent to the parent, raised there
                yield False, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")

    _write_frames(results, outcomes())


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - any failure to pickle means: send a plain RuntimeError instead
        return False


class ProcessWriter:
    """The same contract as `BackgroundWriter`, with the work done in a forked child process: report
    rendering (Jinja, chart specs, JSON, two atomic files: ~2 ms of pure Python a report) then runs
    beside the encoder loop instead of taking turns with it on this process's GIL.

    `work(*args)` runs in the child; `done(item, value)` runs here, in submission order, with what it
    returned (an item submitted without args only goes through `done`, with None, in its turn). At most
    `max_pending` submissions are in flight (memory stays flat; a slow disk slows the producer). The
    child's first exception is raised here at the next `submit` or at `close`, never swallowed. Forked,
    so the child sees this process's state at the time the writer is made (made before the engine starts
    its own workers and threads). `available()`: fork exists (Linux).

    Tasks and results travel on two pipes that only the calling thread writes and reads, with no helper
    thread in this process: ProcessPoolExecutor's two (its manager and its queue feeder) woke at every
    report and took the GIL from the encoder's streams - 3 ms of this process's CPU an image in
    development measurements (batch at 70 images/s with them, 80 without reports at all)."""

    def __init__(self, work: Callable, done: Callable[[object, object], None], max_pending: int = 32):
        import multiprocessing

        task_r, self._tasks = os.pipe()
        self._results, result_w = os.pipe()
        self._child = multiprocessing.get_context("fork").Process(
            target=_child_main, args=(work, task_r, result_w, (self._tasks, self._results), os.getpid()),
            name="vlm-writer", daemon=True)
        self._child.start()
        os.close(task_r)
        os.close(result_w)
        os.set_blocking(self._tasks, False)
        self._done, self._max = done, max(1, max_pending)
        self._pending: deque = deque()  # (item, has work), in submission order
        self._outcomes: deque = deque()  # the child's (ok, value), in the same order
        self._in_flight = 0
        self._unsent = memoryview(b"")
        self._received = bytearray()
        self._open = True

    @property
    def pid(self) -> int:
        return self._child.pid

    @staticmethod
    def available() -> bool:
        import multiprocessing
        import sys

        return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()

    def submit(self, item, *args) -> None:
        self._pending.append((item, bool(args)))
        if args:
            self._unsent = memoryview(_frame(args))
            self._in_flight += 1
            self._send()
        self._deliver()
        while self._in_flight > self._max:
            self._wait()

    def _send(self) -> None:
        """Write the unsent frame, reading results whenever they come, so neither side blocks the other
        (the child may wait on a full result pipe while this waits on a full task pipe)."""
        poll = select.poll()
        poll.register(self._tasks, select.POLLOUT)
        poll.register(self._results, select.POLLIN)
        while self._unsent:
            for fd, _ in poll.poll():
                if fd == self._results:
                    self._receive()
                elif self._unsent:
                    try:
                        self._unsent = self._unsent[os.write(self._tasks, self._unsent):]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # the child is gone: read what it sent; its end raises
                        while True:
                            self._receive()

    def _receive(self) -> None:
        chunk = os.read(self._results, 1 << 16)
        if not chunk:
            self._child.join(timeout=5)
            raise RuntimeError(f"the report writer process stopped unexpectedly (exit code {self._child.exitcode}); "
                               f"{self._in_flight} reports were not written")
        self._received += chunk
        while len(self._received) >= _FRAME.size:
            size = _FRAME.unpack_from(self._received)[0]
            if len(self._received) < _FRAME.size + size:
                return
            self._outcomes.append(pickle.loads(self._received[_FRAME.size:_FRAME.size + size]))
            del self._received[:_FRAME.size + size]

    def _wait(self) -> None:
        """Block until the child returns something, then hand it on."""
        if not self._outcomes:
            self._receive()
        self._deliver()

    def _deliver(self) -> None:
        while self._pending and (not self._pending[0][1] or self._outcomes):
            item, has_work = self._pending.popleft()
            if not has_work:
                self._done(item, None)
                continue
            ok, value = self._outcomes.popleft()
            self._in_flight -= 1
            if not ok:
                raise value
            self._done(item, value)

    def _drain(self) -> None:
        self._send()
        while self._in_flight:
            self._wait()
        self._deliver()

    def _stop(self) -> None:
        if self._open:
            self._open = False
            os.close(self._tasks)  # the child ends at the end of its task pipe
            self._child.join(timeout=30)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            os.close(self._results)

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self._stop()

    def __enter__(self) -> "ProcessWriter":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None:
            self.close()
            return False
        # the producer failed (or was interrupted): finish what was submitted, as the thread writer does,
        # so a resumed run finds those reports; the producer's exception is the one raised
        try:
            self._drain()
        except Exception as e:  # noqa: BLE001 - secondary to the producer's exception, which propagates
            logger.error("report writer failed while stopping after an error: %s: %s", type(e).__name__, e)
        finally:
            if self._in_flight:  # the drain failed: what is left is not waited for
                self._child.kill()
            self._stop()
        return False
