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
from .eventstate import EventState

__all__ = ["HostStream", "NullStream", "HostEvent"]


def _memmove(dst: int, src: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memmove(dst, src, nbytes)


def _memset(ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memset(ptr, value, nbytes)


class _HostStreamBase(Stream):
    """What the host's two kinds of stream share: every operation is a call ``fn(*args)``."""

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        raise NotImplementedError

    def _record(self, state: EventState, timing: bool) -> None:
        raise NotImplementedError

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
        if not state.reached(target[0]):
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
        self._failure: tuple[BaseException, str] | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="hipipc-stream", daemon=True)
        self._worker.start()

    @property
    def destroyed(self) -> bool:
        return self._closed

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
                if self._failure is None:
                    self._failure = (exc, what)
            # Drop the operation's references now: they may pin mappings or host buffers.
            item = fn = args = None
            self._done += 1

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        with self._lock:
            if self._closed:
                raise destroyed_stream()
            self._submitted += 1
            self._queue.put((fn, args, what))

    def _record(self, state: EventState, timing: bool) -> None:
        pid, start = own_process()
        with self._lock:
            # Checked before reserving: a number that is handed out must complete.
            if self._closed:
                raise destroyed_stream()
            seq = state.reserve(pid, start)
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

    @property
    def destroyed(self) -> bool:
        return self._state is None

    @property
    def handle(self) -> IpcEventHandle | None:
        return self._handle

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
        self._close_fd()
        self._store = None  # the parent exported it; only the parent revokes

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # destructors never raise
            pass


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, float(timeout))
