"""A database read on a thread of its own, one batch ahead of the engine (no Airflow import).

Reading a PostgreSQL result through ADBC is mostly waiting: the server writes the rows, the driver decodes them
without the GIL. Converting a batch to canonical columns is the engine's own work. Run one after the other, the run
takes their sum; with the read on a thread that keeps a bounded number of batches ready (:data:`READ_AHEAD`), it
takes about the longer of the two, and memory stays a few batches.

The thread owns everything of the read: it opens the connection, runs the statements, reads the batches, commits
(only once the engine has taken the last batch, as a reader that runs in the engine's thread commits) and closes the
connection, once. The engine's side is a generator (:func:`read_ahead`); when it stops early (the generator is
closed, the engine raised, the task's timeout or SIGTERM raised inside it), it tells the thread to stop, cancels the
query the thread may be waiting on (ADBC's cancel is the one call that is safe from another thread) and waits a
bounded time for the thread to close its connection. The engine waits for the thread in short steps, so that a
signal handler's exception (KeyboardInterrupt on SIGINT too, whose handler polars installs with SA_RESTART) is raised
at once. Airflow 3 raises nothing on SIGTERM: it calls the operator's ``on_kill``, which :func:`cancel_reads`; the
read then fails with the driver's error. An error of the read is raised by the generator as the read raised it: the
same exception, type and message.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

__all__ = ["READ_AHEAD", "Handoff", "cancel_reads", "read_ahead"]

log = logging.getLogger(__name__)

#: Batches the thread keeps ready beyond the one the engine converts and the one the driver is reading.
READ_AHEAD = 1
#: How long stopping waits for the thread to close its connection once the query was cancelled. A cancelled query
#: returns at once; only a network that stopped answering makes the driver wait longer, and the thread then closes
#: the connection when the driver returns (it is a daemon thread: it never keeps the process alive).
STOP_WAIT_SECONDS = 30.0
#: The thread's name, so that a leak is easy to see (and for the tests).
THREAD_NAME = "stopchurn-source-reader"
#: The reads running in this process, for :func:`cancel_reads` (Airflow runs one task per process).
_RUNNING: set[Handoff] = set()
#: How long :func:`cancel_reads` waits for a read's cancel; it runs in a signal handler, maybe while the same thread
#: holds the lock (stopping that read, which cancels it anyway).
_INTERRUPT_WAIT_SECONDS = 1.0
#: How long the engine's thread waits for the reader at a time. polars installs its SIGINT handler with SA_RESTART,
#: which resumes a wait the signal interrupted: only a wait that returns lets Python raise KeyboardInterrupt (and
#: then cancel the query), as ADBC's own SIGINT handler did when the engine's thread read.
_WAKE_SECONDS = 0.2


class _Stopped(Exception):
    """The engine stopped reading: the thread unwinds and closes its connection."""


class _End:
    """After the last batch."""


class _Failed:
    """The read raised ``error``: the engine's side raises it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Handoff:
    """What the reading thread and the engine share: a bounded queue of batches, a stop flag, the query's cancel.

    :param depth: batches the queue holds before the thread waits (at least one).
    """

    def __init__(self, depth: int) -> None:
        # at least one: a queue of size 0 would have no bound at all
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._verdict: queue.Queue[bool] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._interrupted = threading.Event()
        self._cancel_lock = threading.Lock()
        self._cancel: Callable[[], None] | None = None

    # --- the reading thread's side --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`_Stopped` once the engine has stopped reading."""
        if self._stop.is_set():
            raise _Stopped

    def put(self, batch: pa.RecordBatch) -> None:
        """Hand one batch over; blocks while the queue is full. Raises :class:`_Stopped` once the engine has
        stopped (it empties the queue then, so a blocked put returns).

        :param batch: the next batch of the result.
        """
        self.check()
        self._queue.put(batch)
        self.check()

    def finished(self) -> bool:
        """Say the last batch was read, and wait for the engine: True once it took the end (commit), False when it
        stopped before (do not)."""
        self.check()
        self._queue.put(_End())
        return self._verdict.get()

    def cancel_with(self, cancel: Callable[[], None] | None) -> None:
        """Set (or, with None, clear, before the statement is closed) what cancels the running query.

        :param cancel: a call that is safe from another thread (ADBC's ``adbc_cancel``), or None.
        """
        with self._cancel_lock:
            # checked under the lock: a stop that comes later finds the cancel and calls it
            if cancel is not None and self._stop.is_set():
                raise _Stopped
            self._cancel = cancel

    def interrupt(self) -> None:
        """Cancel the running query, if any, without stopping the read: the thread then hands over the driver's
        error, which the engine raises (see :func:`cancel_reads`)."""
        self._interrupted.set()  # before the cancel: a failure the cancel causes finds it set
        if not self._cancel_lock.acquire(timeout=_INTERRUPT_WAIT_SECONDS):
            return
        try:
            self._call_cancel()
        finally:
            self._cancel_lock.release()

    def cancelled(self) -> bool:
        """Whether the query was cancelled (:meth:`interrupt`, :meth:`stop`): a statement that failed since may
        have failed for that."""
        return self._interrupted.is_set() or self._stop.is_set()

    def _call_cancel(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            try:
                cancel()
            except Exception as exc:  # the query may have ended meanwhile: nothing to cancel
                log.debug("Cancelling the source query failed: %s", type(exc).__name__)

    def _fail(self, error: BaseException) -> None:
        if not self._stop.is_set():
            self._queue.put(_Failed(error))

    # --- the engine's side ----------------------------------------------------------------------------------
    def take(self) -> Any:
        """The next batch, :class:`_End` or :class:`_Failed`, in the order the thread handed them over."""
        while True:
            with contextlib.suppress(queue.Empty):  # woken now and then: see _WAKE_SECONDS
                return self._queue.get(timeout=_WAKE_SECONDS)

    def take_left(self) -> Any:
        """What the thread handed over after the end (a failed commit), or None."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def commit(self) -> None:
        """Tell the thread that the engine took the end: it commits."""
        self._verdict.put(True)

    def stop(self) -> None:
        """Tell the thread to stop, cancel its query and unblock it."""
        self._stop.set()
        with self._cancel_lock:
            self._call_cancel()
        with contextlib.suppress(queue.Full):  # the verdict was given already (the thread is committing)
            self._verdict.put_nowait(False)
        while True:  # unblock a put waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


def read_ahead(produce: Callable[[Handoff], None], *, depth: int = READ_AHEAD) -> Iterator[pa.RecordBatch]:
    """The batches ``produce`` hands over, read on a thread of their own, ``depth`` batches ahead.

    ``produce(handoff)`` runs on the thread: it reads, passes each batch to ``handoff.put``, calls
    ``handoff.finished()`` after the last one (commit when it returns True) and closes what it opened whatever
    happens; it sets ``handoff.cancel_with`` while a query runs. The thread starts when the first batch is asked for.
    An exception of ``produce`` is raised here, unchanged; stopping early stops and cancels the read (see the module).

    :param produce: the read, run on the thread with the :class:`Handoff` it shares with this generator.
    :param depth: batches kept ready beyond the one the engine holds (at least one).
    """
    handoff = Handoff(depth)
    # the caller's context variables (a task's logging context) go with the read
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(_run, produce, handoff), name=THREAD_NAME, daemon=True)
    _RUNNING.add(handoff)
    thread.start()
    done = False
    try:
        while True:
            item = handoff.take()
            if isinstance(item, _End):
                handoff.commit()
                _join(thread)  # the commit's outcome, and the connection closed, before the read counts as done
                done = True
                item = handoff.take_left()
                if isinstance(item, _Failed):  # the commit failed
                    raise item.error
                return
            if isinstance(item, _Failed):
                _join(thread)  # it has closed its connection: the error is raised with the read over
                done = True
                raise item.error
            yield item
    finally:
        _RUNNING.discard(handoff)
        if not done:
            handoff.stop()
            thread.join(STOP_WAIT_SECONDS)
            if thread.is_alive():
                log.warning(
                    "The source's reader did not stop within %.0f s of its query being cancelled; it closes its "
                    "database connection when the driver returns.",
                    STOP_WAIT_SECONDS,
                )


def _join(thread: threading.Thread) -> None:
    """Wait for ``thread`` to end, woken now and then so that a signal can raise here (see _WAKE_SECONDS)."""
    while thread.is_alive():
        thread.join(_WAKE_SECONDS)


def cancel_reads() -> None:
    """Cancel the query of every read running in this process; each read then raises the driver's error.

    For an operator's ``on_kill``: on SIGTERM, Airflow 3's task runner calls ``on_kill()`` from its signal handler and
    raises nothing in the task's thread, so without this the query runs on (on the server, after the task was killed,
    until it next writes to the closed connection).
    """
    for handoff in tuple(_RUNNING):  # a copy: the handler may run while the engine's thread adds or removes one
        handoff.interrupt()


def _run(produce: Callable[[Handoff], None], handoff: Handoff) -> None:
    try:
        produce(handoff)
    except _Stopped:
        pass
    except BaseException as exc:  # handed to the engine's thread, which raises it
        handoff._fail(exc)
