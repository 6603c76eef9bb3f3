"""The state of a host event: sequence counters in (shared) memory, a futex, a robust mutex.

One :class:`EventState` is 128 bytes at a fixed address: in a store segment for an
interprocess event (every process that opened the handle maps the same page), or in private
memory for a local event.  Layout (native byte order)::

    0   pthread_mutex_t   process-shared and robust: a holder that dies cannot wedge others
    64  u32 completed     the futex word: the newest sequence number whose work is done
    68  u32 recorded      the newest sequence number handed out by a record
    72  u32 recorder_pid  who made that record ...
    80  u64 recorder_start  ... and that process's start time (pid reuse cannot fool a waiter)
    88  u64 completed_ns  CLOCK_MONOTONIC of the newest completion (timing events)

CUDA's rules map onto it directly: a record takes the next number (``recorded += 1``) when it
is *called*; the stream marks it done when the work before it has run (``completed`` moves
forward, never back); an event is complete when ``completed`` has reached ``recorded``; a wait
or synchronize waits for the number that was newest *as of the call*.  A never-recorded event
(both 0) is complete.  Numbers are u32 compared in serial arithmetic, so they may wrap.

Waiters sleep in ``FUTEX_WAIT`` on ``completed`` (no core burnt, woken by the completer's
``FUTEX_WAKE``) in slices of :data:`LIVENESS_INTERVAL`; between slices a waiter checks that the
process which made the record it waits for still runs.  If that process exited before the work
completed, the wait raises ``hipErrorLaunchFailure`` instead of hanging forever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import time
from typing import Any

from ..errors import HipError, hipError_t
from ..store import process_start_time

__all__ = ["EventState", "STATE_SIZE", "LIVENESS_INTERVAL", "Target"]

STATE_SIZE = 128
LIVENESS_INTERVAL = 0.1  # seconds between checks that a waited-for recorder still runs

_MUTEX_OFFSET, _MUTEX_SPACE = 0, 64
_COMPLETED, _RECORDED, _RECORDER_PID, _RECORDER_START, _COMPLETED_NS = 64, 68, 72, 80, 88

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_mutex_lock = _libc.pthread_mutex_lock
_mutex_unlock = _libc.pthread_mutex_unlock
_mutex_consistent = _libc.pthread_mutex_consistent
for _fn in (_mutex_lock, _mutex_unlock, _mutex_consistent):
    _fn.restype = ctypes.c_int
    _fn.argtypes = [ctypes.c_void_p]

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "ppc64le": 221, "s390x": 238,
              "riscv64": 98}.get(platform.machine(), 202)
# No FUTEX_PRIVATE_FLAG: the word lives in a shared file mapping, waited on by other processes.
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_INT_MAX = 0x7FFFFFFF
_EOWNERDEAD = 130
_PTHREAD_PROCESS_SHARED, _PTHREAD_MUTEX_ROBUST = 1, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, seconds: float) -> int:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``seconds``; 0 or errno."""
    ts = _Timespec(int(seconds), int((seconds % 1.0) * 1e9))
    # syscall() is variadic: every argument must have its full C width.
    rc = _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAIT),
                  ctypes.c_long(expected), ctypes.byref(ts), ctypes.c_void_p(0),
                  ctypes.c_long(0))
    return 0 if rc == 0 else ctypes.get_errno()


def _futex_wake_all(addr: int) -> None:
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE),
             ctypes.c_long(_INT_MAX), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_long(0))


def _init_mutex(addr: int) -> None:
    attr = (ctypes.c_uint64 * 2)()  # pthread_mutexattr_t is 4 or 8 bytes; room to spare
    for call, *args in ((_libc.pthread_mutexattr_init,),
                        (_libc.pthread_mutexattr_setpshared, _PTHREAD_PROCESS_SHARED),
                        (_libc.pthread_mutexattr_setrobust, _PTHREAD_MUTEX_ROBUST)):
        rc = call(ctypes.byref(attr), *(ctypes.c_int(a) for a in args))
        if rc:
            raise HipError(hipError_t.hipErrorOperatingSystem,
                           f"cannot set up a process-shared mutex: {os.strerror(rc)}")
    rc = _libc.pthread_mutex_init(ctypes.c_void_p(addr), ctypes.byref(attr))
    _libc.pthread_mutexattr_destroy(ctypes.byref(attr))
    if rc:
        raise HipError(hipError_t.hipErrorOperatingSystem,
                       f"cannot initialise a process-shared mutex: {os.strerror(rc)}")


def _serial_ge(a: int, b: int) -> bool:
    """``a >= b`` for u32 sequence numbers that may have wrapped."""
    return (a - b) & 0xFFFFFFFF < 0x80000000


Target = tuple[int, int, int]
"""What a wait waits for: (sequence number, recorder pid, recorder start time)."""


class EventState:
    """The 128-byte state of one event at ``addr``; ``keepalive`` pins the memory.

    ``initialize=True`` (the creator) zeroes nothing (new memory is zero) but sets up the
    mutex; openers pass False.  Any object that holds this state keeps the memory mapped, so a
    stream operation or a waiter can outlive ``hipEventDestroy`` safely.
    """

    __slots__ = ("addr", "_keepalive", "_mutex", "_completed", "_recorded", "_pid", "_start",
                 "_completed_ns")

    def __init__(self, addr: int, keepalive: Any, *, initialize: bool) -> None:
        self.addr = addr
        self._keepalive = keepalive
        self._mutex = ctypes.c_void_p(addr + _MUTEX_OFFSET)
        self._completed = ctypes.c_uint32.from_address(addr + _COMPLETED)
        self._recorded = ctypes.c_uint32.from_address(addr + _RECORDED)
        self._pid = ctypes.c_uint32.from_address(addr + _RECORDER_PID)
        self._start = ctypes.c_uint64.from_address(addr + _RECORDER_START)
        self._completed_ns = ctypes.c_uint64.from_address(addr + _COMPLETED_NS)
        if initialize:
            _init_mutex(addr + _MUTEX_OFFSET)

    @classmethod
    def private(cls) -> EventState:
        """State in this process's own memory, for an event that is not interprocess."""
        buf = (ctypes.c_uint64 * (STATE_SIZE // 8))()
        return cls(ctypes.addressof(buf), buf, initialize=True)

    # -- the mutex -------------------------------------------------------------------------

    def _lock(self) -> None:
        rc = _mutex_lock(self._mutex)
        if rc == _EOWNERDEAD:
            # A holder died mid-update; the fields are single words, each valid on its own.
            _mutex_consistent(self._mutex)
        elif rc:
            raise HipError(hipError_t.hipErrorOperatingSystem,
                           f"event mutex: {os.strerror(rc)}")

    def _unlock(self) -> None:
        _mutex_unlock(self._mutex)

    # -- record / complete -----------------------------------------------------------------

    def reserve(self, pid: int, start: int) -> int:
        """A record: take the next sequence number in the name of process (pid, start)."""
        self._lock()
        try:
            seq = (self._recorded.value + 1) & 0xFFFFFFFF
            self._recorded.value = seq
            self._pid.value = pid
            self._start.value = start
        finally:
            self._unlock()
        return seq

    def complete(self, seq: int, timing: bool) -> None:
        """The work before record ``seq`` is done: move ``completed`` forward and wake waiters."""
        self._lock()
        try:
            if _serial_ge(self._completed.value, seq):
                return  # a newer record completed first; completion never moves back
            if timing:
                self._completed_ns.value = time.perf_counter_ns()
            self._completed.value = seq
        finally:
            self._unlock()
        _futex_wake_all(self.addr + _COMPLETED)

    # -- observe / wait --------------------------------------------------------------------

    def target(self) -> Target:
        """The newest record as of now, with its recorder: what a wait issued now waits for."""
        self._lock()
        try:
            return self._recorded.value, self._pid.value, self._start.value
        finally:
            self._unlock()

    def reached(self, seq: int) -> bool:
        return _serial_ge(self._completed.value, seq)

    def is_complete(self) -> bool:
        """CUDA's query: the newest record's work is done (or nothing was ever recorded)."""
        return _serial_ge(self._completed.value, self._recorded.value)

    @property
    def completed_ns(self) -> int:
        return self._completed_ns.value

    def check_recorder(self, target: Target) -> None:
        """Raise ``hipErrorLaunchFailure`` if ``target`` is pending and its recorder has exited."""
        seq, pid, start = target
        if pid == os.getpid() or self.reached(seq):
            return
        now = process_start_time(pid)
        if now is not None and (now == start or now == -1):
            return
        if self.reached(seq):
            return
        raise HipError(hipError_t.hipErrorLaunchFailure,
                       f"process {pid}, which recorded this event, exited before the recorded "
                       "work completed; the event will never complete")

    def wait(self, target: Target, deadline: float | None) -> None:
        """Block until ``target`` is reached; GIL released while asleep.

        Raises ``hipErrorNotReady`` when ``deadline`` (``time.monotonic()``) passes first, and
        ``hipErrorLaunchFailure`` (within about :data:`LIVENESS_INTERVAL`) when the recorder
        exits before completing it.
        """
        seq = target[0]
        word = self._completed
        addr = self.addr + _COMPLETED
        next_check = time.monotonic() + LIVENESS_INTERVAL
        while True:
            current = word.value
            if _serial_ge(current, seq):
                return
            now = time.monotonic()
            if now >= next_check:
                self.check_recorder(target)
                next_check = now + LIVENESS_INTERVAL
            if deadline is not None and now >= deadline:
                raise HipError(hipError_t.hipErrorNotReady,
                               "the event's recorded work did not complete before the timeout")
            limit = next_check if deadline is None else min(next_check, deadline)
            err = _futex_wait(addr, current, max(limit - now, 0.0))
            if err not in (0, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise HipError(hipError_t.hipErrorOperatingSystem,
                               f"futex wait failed: {os.strerror(err)}")
