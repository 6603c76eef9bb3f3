"""Streams and events of the host backend.

A :class:`HostStream` is an ordered queue worked by one daemon thread: enqueueing is a lock and
a ``SimpleQueue.put`` (it never waits for earlier work), and numpy copies, ``memmove`` and
futex waits release the GIL while they run.  The null stream (:class:`NullStream`) is one more
such queue, CUDA's legacy default stream, with the implicit ordering against the blocking
streams that its class docstring describes; ``hipMemcpy``/``hipMemset`` wait for it and then
run in the caller (:meth:`NullStream.synchronous`).

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
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import HipError, hipError_t, short_repr
from ..events import Event, destroyed_event
from ..handle import IpcEventHandle
from ..segstore import Transport
from ..store import own_process
from ..streams import (
    Stream,
    destroyed_stream,
    launch_failure,
    mark_stream_worker,
    running_on_stream,
)
from ..timeouts import check_timeout
from ..timeouts import deadline as _deadline
from .eventstate import LIVENESS_INTERVAL, EventState

__all__ = ["HostStream", "NullStream", "HostEvent"]


def _memmove(dst: int, src: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memmove(dst, src, nbytes)


def _memset(ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
    ctypes.memset(ptr, value, nbytes)


def _nothing() -> None:
    pass


class _HostStreamBase(Stream):
    """What the host's two kinds of stream share: every operation is a call ``fn(*args)``."""

    @abc.abstractmethod
    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        """Run ``fn(*args)`` in stream order; ``what`` names it in a failure report."""

    @abc.abstractmethod
    def _record(self, state: EventState, timing: bool) -> None:
        """Reserve a record of ``state`` now and complete it in stream order."""

    def launch_host_func(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        name = getattr(fn, "__qualname__", None)
        if not isinstance(name, str) or len(name) > 80:
            name = short_repr(fn)
        self._enqueue(fn, args, f"host function {name}")

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, keep: tuple[Any, ...]) -> None:
        self._enqueue(_memmove, (dst, src, nbytes, keep), "hipMemcpyAsync")

    def memset(self, ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
        self._enqueue(_memset, (ptr, value, nbytes, keep), "hipMemsetAsync")

    def wait_event(self, event: Event) -> None:
        state = _state_of(event)
        target = state.target()
        if not state.is_done(target[0]):
            if state.shared:  # a wait that could never end is refused now, not enqueued
                state.check_target(target, bounded=False)
            self._enqueue(state.wait, (target, None), "hipStreamWaitEvent")


class HostStream(_HostStreamBase):
    """A stream worked by its own daemon thread."""

    def __init__(self, device: int, blocking: bool = True, null: NullStream | None = None) -> None:
        self.device = device
        self.blocking = blocking
        # A blocking stream follows the null stream (legacy default stream), both ways.
        self._null = null if blocking else None
        self._followed = 0  # the number of the null-stream operation last waited for
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
        if self._null is not None:
            self._null.add_peer(self)

    @property
    def destroyed(self) -> bool:
        # An inherited stream is not "destroyed": its calls say "created before fork".
        return self._closed and not self._forked_from

    def _run(self) -> None:
        mark_stream_worker()
        get = self._queue.get
        fn: Callable[..., Any] | None  # None once run: see below
        args: tuple[Any, ...] | None
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
            return HipError(
                hipError_t.hipErrorInvalidContext,
                f"the stream was created in process {self._forked_from} before "
                "fork and has no worker here; create streams in the child",
            )
        return destroyed_stream()

    def _follow_null(self) -> None:
        """Under ``_lock``, before new work: if a null-stream operation enqueued earlier is
        still pending, make this stream wait for it first (CUDA's legacy default stream)."""
        null = self._null
        if null is None:
            return
        newest = null._submitted  # read without the null stream's lock (see NullStream)
        if newest <= self._followed or null._done >= newest:
            return
        self._followed = newest
        self._submitted += 1
        # Unbounded, as work on CUDA's default stream; the null stream never waits for this.
        self._queue.put((null.wait_for, (newest,), "the wait for the null stream"))

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._follow_null()
            self._submitted += 1
            self._queue.put((fn, args, what))

    def _record(self, state: EventState, timing: bool) -> None:
        pid, start, pidns = own_process()
        with self._lock:
            # Checked before reserving: a number that is handed out must complete.
            if self._closed:
                raise self._closed_error()
            seq = state.reserve(pid, start, pidns)
            self._follow_null()
            self._submitted += 1
            self._queue.put((state.complete, (seq, timing), "hipEventRecord"))

    def _marker(self) -> Callable[..., bool] | None:
        """``wait(timeout=None) -> bool``, true once the work enqueued here so far has run;
        None if there is none.  Never waits for the null stream (see :class:`NullStream`)."""
        with self._lock:
            if self._done == self._submitted:
                return None
            if self._closed:  # destroyed (or inherited over fork): the worker ends after it
                worker = self._worker

                def join(timeout: float | None = None) -> bool:
                    worker.join(timeout)
                    return not worker.is_alive()

                return join
            marker = threading.Event()
            self._submitted += 1
            self._queue.put((marker.set, (), "a null-stream marker"))
            return marker.wait

    def query(self) -> bool:
        return self._done == self._submitted

    def wait_idle(self, timeout: float | None) -> None:
        timeout = check_timeout(timeout)  # threading overflows past ~9.2e9 s, nan loops
        wait = self._marker()  # not behind a later null-stream operation: no wait for it
        if wait is not None and not wait(timeout):
            raise HipError(
                hipError_t.hipErrorNotReady, f"the stream's work did not finish within {timeout} s"
            )

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
    """The null stream: CUDA's legacy default stream, asynchronous to the host.

    Its operations run in order on one daemon thread, started by the first one, and the
    enqueueing call returns at once.  The legacy ordering with the *blocking* streams (every
    stream not made with ``hipStreamNonBlocking``) holds both ways:

    - an operation enqueued here waits for the work enqueued before it on every blocking
      stream: each busy one gets a marker (:meth:`HostStream._marker`) that the null worker
      waits for before it runs the operation;
    - work enqueued on a blocking stream after a null-stream operation waits for it: the
      stream reads the newest operation's number (``_submitted``) when it enqueues, and if
      that operation has not run (``_done`` is below it), enqueues a :meth:`wait_for` first.

    No cycle is possible: markers never wait for the null stream, and an operation's markers
    are in their queues before its number is published (``_submitted`` grows after them), so a
    stream that waits for it has the marker it waits for ahead of that wait.  Locks are taken
    null first, then a stream's; a stream reads the numbers without the null stream's lock.
    Operations carry no per-operation object: the worker counts ``_done`` and wakes waiters
    through one condition, only when there are any.  A failure is kept for the next
    synchronize of the null stream or the device, as on any stream.
    """

    is_null = True

    def __init__(self) -> None:
        self.device = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._submitted = 0  # under _lock; operation n is the n-th submitted
        self._done = 0  # written only by the worker
        self._ran = threading.Condition(threading.Lock())  # notified when _done grows
        self._waiters = 0  # under _ran's lock
        self._failure: tuple[BaseException, str] | None = None  # under _lock
        self._worker: threading.Thread | None = None
        # The blocking streams, weakly: a tuple read without the lock (iterating a WeakSet on
        # every operation and every hipMemcpy costs several microseconds).
        self._peer_refs: tuple[weakref.ref[HostStream], ...] = ()
        self._forgotten = False
        self._caller = _CallerStream(self)

    @property
    def destroyed(self) -> bool:
        return False

    def add_peer(self, stream: HostStream) -> None:
        """Order ``stream`` (a blocking stream) with this one."""
        with self._lock:
            live = tuple(r for r in self._peer_refs if r() is not None)
            self._peer_refs = (*live, weakref.ref(stream))

    def _peers(self) -> list[HostStream]:
        return [s for s in (r() for r in self._peer_refs) if s is not None]

    def synchronous(self) -> Stream:
        return self._caller

    def _run(self) -> None:
        mark_stream_worker()
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args, what, waits = item
            try:
                for wait in waits:
                    wait()
                fn(*args)
            except BaseException as exc:  # reported by the next synchronize
                with self._lock:
                    if self._failure is None:
                        self._failure = (exc, what)
            # Drop the operation's references now: they may pin mappings or host buffers.
            item = fn = args = waits = None
            self._done += 1
            # A waiter counts itself before it reads _done, so either it sees this increment
            # or this read sees it (the GIL orders both), and no wake-up is lost.
            if self._waiters:
                with self._ran:
                    self._ran.notify_all()

    def wait_for(self, number: int, timeout: float | None = None) -> bool:
        """True once operation ``number`` has run; False after ``timeout`` seconds."""
        if self._done >= number:
            return True
        with self._ran:
            self._waiters += 1
            try:
                return self._ran.wait_for(lambda: self._done >= number, timeout)
            finally:
                self._waiters -= 1

    def _start_locked(self) -> None:
        if self._forgotten:
            raise HipError(
                hipError_t.hipErrorInvalidContext,
                "this null stream belongs to the parent process; use None or 0",
            )
        if self._worker is None:  # lazily: most processes never use the null stream
            worker = threading.Thread(target=self._run, name="hipipc-null-stream", daemon=True)
            worker.start()
            self._worker = worker

    def _submit_locked(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        self._start_locked()
        waits = [w for w in (s._marker() for s in self._peers()) if w is not None]
        # Published after the markers are in their queues (see above), and before the put, so
        # that _done never passes _submitted.
        self._submitted += 1
        self._queue.put((fn, args, what, waits))

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        with self._lock:
            self._submit_locked(fn, args, what)

    def _record(self, state: EventState, timing: bool) -> None:
        pid, start, pidns = own_process()
        with self._lock:
            self._start_locked()  # first: a number that is handed out must complete
            seq = state.reserve(pid, start, pidns)
            self._submit_locked(state.complete, (seq, timing), "hipEventRecord")

    def query(self) -> bool:
        if self._done != self._submitted:
            return False
        # No blocking stream (the common case on the open/close path): nothing to ask.
        return not self._peer_refs or all(s.query() for s in self._peers())

    def wait_idle(self, timeout: float | None) -> None:
        """Wait for this queue and, through it, for the work enqueued before now on every
        blocking stream (a null-stream synchronize)."""
        timeout = check_timeout(timeout)  # Condition.wait overflows past ~9.2e9 s
        if self._forgotten:
            return
        with self._lock:
            if any(not s.query() for s in self._peers()):
                self._submit_locked(_nothing, (), "synchronize")  # collects their markers
            newest = self._submitted
        if not self.wait_for(newest, timeout):
            raise HipError(
                hipError_t.hipErrorNotReady,
                f"the null stream's work did not finish within {timeout} s",
            )

    def report_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise launch_failure(*failure)

    def destroy(self) -> None:
        raise HipError(hipError_t.hipErrorInvalidHandle, "the null stream cannot be destroyed")

    def forget(self) -> None:
        """In a forked child: no worker survives fork; the child's registry makes a fresh
        null stream, and this one refuses work."""
        self._forgotten = True
        self._lock = threading.Lock()  # another thread may have held it at fork time
        self._ran = threading.Condition(threading.Lock())
        self._peer_refs = ()
        self._failure = None


class _CallerStream(_HostStreamBase):
    """The null stream as ``hipMemcpy``/``hipMemset`` use it: each operation waits for the
    null stream's queue (and so for the blocking streams' earlier work), then runs in the
    caller before returning, as ``cudaMemcpy`` does.  Stream work (a host function) skips
    the wait, which could wait for itself; a failure raises at once."""

    is_null = True

    def __init__(self, null: NullStream) -> None:
        self.device = 0
        self._null = null

    @property
    def destroyed(self) -> bool:
        return False

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        if not running_on_stream():
            self._null.wait_idle(None)
        try:
            fn(*args)
        except Exception as exc:
            raise launch_failure(exc, what.replace("Async", "")) from exc

    def _record(self, state: EventState, timing: bool) -> None:
        self._null._record(state, timing)

    def query(self) -> bool:
        return self._null.query()

    def wait_idle(self, timeout: float | None) -> None:
        self._null.wait_idle(timeout)

    def report_failure(self) -> None:
        self._null.report_failure()

    def destroy(self) -> None:
        self._null.destroy()


def _state_of(event: Event) -> EventState:
    if not isinstance(event, HostEvent):
        raise HipError(
            hipError_t.hipErrorInvalidHandle,
            f"{short_repr(event)} is not an event of the host backend",
        )
    state = event._state
    if state is None:
        if event._forked_from:
            raise HipError(
                hipError_t.hipErrorInvalidContext,
                f"the event was created in process {event._forked_from} before "
                "fork; its records complete there, not here: create events in the "
                "child (interprocess events can be opened by handle)",
            )
        raise destroyed_event()
    return state


class HostEvent(Event):
    """An event of the host backend.

    Local events keep their state in private memory.  Interprocess events keep it in a store
    segment: the creator holds the unnamed segment's descriptor until ``export`` links it in
    (as for memory), openers map the page the handle names.
    """

    def __init__(
        self,
        flags: int,
        device: int,
        state: EventState,
        handle: IpcEventHandle | None = None,
        *,
        store: Transport | None = None,
        fd: int = -1,
    ) -> None:
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
            raise HipError(
                hipError_t.hipErrorInvalidHandle,
                f"{short_repr(stream)} is not a stream of the host backend",
            )
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
                raise HipError(
                    hipError_t.hipErrorInvalidHandle,
                    "hipEventElapsedTime needs events created without hipEventDisableTiming",
                )
            if state.target()[0] == 0:
                raise HipError(
                    hipError_t.hipErrorInvalidHandle,
                    "hipEventElapsedTime needs events that were recorded",
                )
            if not state.is_complete():
                raise HipError(
                    hipError_t.hipErrorNotReady, "an event's recorded work has not completed yet"
                )
        return (end_state.completed_ns - start_state.completed_ns) / 1e6

    def export(self, mode: int) -> IpcEventHandle:
        _state_of(self)
        if self._handle is None:
            # HIP's runtime returns hipErrorInvalidConfiguration here (hip-tests accept it or
            # hipErrorInvalidHandle); CUDA says cudaErrorInvalidResourceHandle.
            raise HipError(
                hipError_t.hipErrorInvalidConfiguration,
                "hipIpcGetEventHandle needs an event created with "
                "hipEventInterprocess | hipEventDisableTiming",
            )
        with self._lock:
            _state_of(self)  # again under the lock: a concurrent destroy closed the descriptor
            if self._store is not None and not self._exported:
                self._store.publish(self._fd, self._handle, mode)
                self._exported = True
                # The name keeps the segment alive now; the mapping needs no descriptor.  (The
                # fd transport keeps the descriptor itself, until revoke.)
                if self._store.keeps_published:
                    self._fd = -1
                else:
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
