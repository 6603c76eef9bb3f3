"""Streams and events of the host backend.

A :class:`HostStream` is an ordered queue worked by one daemon thread: enqueueing is a lock and
a ``SimpleQueue.put`` (it never waits for earlier work), and numpy copies, ``memmove`` and
futex waits release the GIL while they run.  The null stream (:class:`NullStream`) runs each
operation in the caller's thread before returning.

A :class:`HostEvent` keeps its counters in an :class:`~.eventstate.EventState`: private
memory for a local event, one page of a store segment for an interprocess event, so that a
record in one process completes a wait in another.
"""

from __future__ import annotations

import abc
import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import HipError, hipError_t
from ..events import Event, destroyed_event
from ..handle import IpcEventHandle
from ..store import HandleStore, own_process
from ..streams import Stream, destroyed_stream, launch_failure, mark_stream_worker
from .eventstate import LIVENESS_INTERVAL, EventState

__all__ = ["HostStream", "NullStream", "HostEvent"]


def _memmove(dst: int, src: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memmove(dst, src, nbytes)


def _memset(ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memset(ptr, value, nbytes)


class _HostStreamBase(Stream):
    """What the host's two kinds of stream share: every operation is a call ``fn(*args)``."""

    @abc.abstractmethod
    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        """Run ``fn(*args)`` in stream order; ``what`` names it in a failure report."""

    @abc.abstractmethod
    def _record(self, state: EventState, timing: bool) -> None:
        """Reserve a record of ``state`` now and complete it in stream order."""

    def launch_host_func(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._enqueue(fn, args, f"host function {getattr(fn, '__qualname__', fn)!s}")

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, keep: tuple[Any, ...]
               ) -> None:
        self._enqueue(_memmove, (dst, src, nbytes, keep), "hipMemcpyAsync")

    def memset(self, ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
        self._enqueue(_memset, (ptr, value, nbytes, keep), "hipMemsetAsync")

    def wait_event(self, event: Event) -> None:
        state = _state_of(event)
        target = state.target()
        if not state.is_done(target[0]):
            self._enqueue(state.wait, (target, None), "hipStreamWaitEvent")


class HostStream(_HostStreamBase):
    """A stream worked by its own daemon thread."""

    def __init__(self, device: int, blocking: bool = True) -> None:
        self.device = device
        self.blocking = blocking
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], str] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._submitted = 0  # written under _lock by enqueuers
        self._done = 0  # written only by the worker
        self._failure: tuple[BaseException, str] | None = None  # under _lock
        self._closed = False
        self._forked_from = 0  # the parent's pid, in a forked child
        self._worker = threading.Thread(target=self._run, name="hipipc-stream", daemon=True)
        self._worker.start()

    @property
    def destroyed(self) -> bool:
        # An inherited stream is not "destroyed": its calls say "created before fork".
        return self._closed and not self._forked_from

    def _run(self) -> None:
        mark_stream_worker()
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args, what = item
            try:
                fn(*args)
            except BaseException as exc:  # reported by the next synchronize
                with self._lock:
                    if self._failure is None:
                        self._failure = (exc, what)
            # Drop the operation's references now: they may pin mappings or host buffers.
            item = fn = args = None
            self._done += 1

    def _closed_error(self) -> HipError:
        if self._forked_from:
            return HipError(hipError_t.hipErrorInvalidContext,
                            f"the stream was created in process {self._forked_from} before "
                            "fork and has no worker here; create streams in the child")
        return destroyed_stream()

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._submitted += 1
            self._queue.put((fn, args, what))

    def _record(self, state: EventState, timing: bool) -> None:
        pid, start, pidns = own_process()
        with self._lock:
            # Checked before reserving: a number that is handed out must complete.
            if self._closed:
                raise self._closed_error()
            seq = state.reserve(pid, start, pidns)
            self._submitted += 1
            self._queue.put((state.complete, (seq, timing), "hipEventRecord"))

    def query(self) -> bool:
        return self._done == self._submitted

    def wait_idle(self, timeout: float | None) -> None:
        if self._closed:
            self._worker.join(timeout)
            finished = not self._worker.is_alive()
        elif self._done != self._submitted:
            marker = threading.Event()
            try:
                self._enqueue(marker.set, (), "synchronize")
            except HipError:  # destroyed meanwhile
                return self.wait_idle(timeout)
            finished = marker.wait(timeout)
        else:
            finished = True
        if not finished:
            raise HipError(hipError_t.hipErrorNotReady,
                           f"the stream's work did not finish within {timeout} s")

    def report_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise launch_failure(*failure)

    def destroy(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)

    def forget(self) -> None:
        self._closed = True  # no worker thread survives fork
        self._forked_from = os.getppid()
        self._lock = threading.Lock()  # another thread may have held it at fork time

    @property
    def finished(self) -> bool:
        return self._closed and not self._worker.is_alive() and self._failure is None


class NullStream(_HostStreamBase):
    """The null stream: each operation runs in the caller's thread before the call returns."""

    is_null = True

    def __init__(self) -> None:
        self.device = 0

    @property
    def destroyed(self) -> bool:
        return False

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        try:
            fn(*args)
        except Exception as exc:
            raise launch_failure(exc, what) from exc

    def _record(self, state: EventState, timing: bool) -> None:
        state.complete(state.reserve(*own_process()), timing)

    def query(self) -> bool:
        return True

    def wait_idle(self, timeout: float | None) -> None:
        pass

    def report_failure(self) -> None:
        pass  # null-stream work raises in the call that runs it

    def destroy(self) -> None:
        raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                       "the null stream cannot be destroyed")


def _state_of(event: Event) -> EventState:
    if not isinstance(event, HostEvent):
        raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                       f"{event!r} is not an event of the host backend")
    state = event._state
    if state is None:
        if event._forked_from:
            raise HipError(hipError_t.hipErrorInvalidContext,
                           f"the event was created in process {event._forked_from} before "
                           "fork; its records complete there, not here: create events in the "
                           "child (interprocess events can be opened by handle)")
        raise destroyed_event()
    return state


class HostEvent(Event):
    """An event of the host backend.

    Local events keep their state in private memory.  Interprocess events keep it in a store
    segment: the creator holds the unnamed segment's descriptor until ``export`` links it in
    (as for memory), openers map the page the handle names.
    """

    def __init__(self, flags: int, device: int, state: EventState,
                 handle: IpcEventHandle | None = None, *, store: HandleStore | None = None,
                 fd: int = -1) -> None:
        self.flags = flags
        self.device = device
        self._state: EventState | None = state
        self._handle = handle
        self._store = store  # set for the creator of an interprocess event
        self._fd = fd  # the unnamed segment, until export links it in
        self._exported = False
        self._lock = threading.Lock()
        self._forked_from = 0  # the parent's pid, for a local event inherited over fork
        self._next_liveness_check = 0.0  # query() reads /proc at most this often

    @property
    def destroyed(self) -> bool:
        return self._state is None

    @property
    def handle(self) -> IpcEventHandle | None:
        return self._handle

    @property
    def exported(self) -> bool:
        """Whether this process linked the event in the store (the exit rule revokes it)."""
        return self._exported

    def record(self, stream: Stream) -> None:
        state = _state_of(self)
        if not isinstance(stream, _HostStreamBase):
            raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                           f"{stream!r} is not a stream of the host backend")
        stream._record(state, self.timing)

    def query(self) -> bool:
        state = _state_of(self)
        if state.is_complete():
            return True
        now = time.monotonic()
        if now >= self._next_liveness_check:  # polling loops must not read /proc each time
            self._next_liveness_check = now + LIVENESS_INTERVAL
            state.check_recorder(state.target())
        return False

    def synchronize(self, timeout: float | None) -> None:
        state = _state_of(self)
        state.wait(state.target(), _deadline(timeout))

    def elapsed_ms(self, end: Event) -> float:
        start_state, end_state = _state_of(self), _state_of(end)
        for ev, state in ((self, start_state), (end, end_state)):
            if not ev.timing:
                raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                               "hipEventElapsedTime needs events created without "
                               "hipEventDisableTiming")
            if state.target()[0] == 0:
                raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                               "hipEventElapsedTime needs events that were recorded")
            if not state.is_complete():
                raise HipError(hipError_t.hipErrorNotReady,
                               "an event's recorded work has not completed yet")
        return (end_state.completed_ns - start_state.completed_ns) / 1e6

    def export(self, mode: int) -> IpcEventHandle:
        _state_of(self)
        if self._handle is None:
            raise HipError(hipError_t.hipErrorInvalidValue,
                           "hipIpcGetEventHandle needs an event created with "
                           "hipEventInterprocess | hipEventDisableTiming")
        with self._lock:
            _state_of(self)  # again under the lock: a concurrent destroy closed the descriptor
            if self._store is not None and not self._exported:
                self._store.publish(self._fd, self._handle, mode)
                self._exported = True
                # The name keeps the segment alive now; the mapping needs no descriptor.
                self._close_fd()
        return self._handle

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def destroy(self) -> None:
        with self._lock:
            if self._state is None:
                return
            # Enqueued records and waiters hold the state themselves and finish normally.
            self._state = None
            try:
                if self._exported and self._store is not None:
                    self._store.revoke(self._handle)  # type: ignore[arg-type]
            finally:
                self._close_fd()

    def forget(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at fork time
        self._close_fd()
        self._store = None  # the parent exported it; only the parent revokes
        if self._handle is None:
            # A local event's records complete in the parent's memory, never in ours.
            self._state = None
            self._forked_from = os.getppid()

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # destructors never raise
            pass


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, float(timeout))
