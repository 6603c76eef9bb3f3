"""The state of a host event: sequence numbers in (shared) memory, a futex, a robust mutex.

One :class:`EventState` is :data:`STATE_SIZE` bytes at a fixed address: in a store segment for
an interprocess event (every process that opened the handle maps the same page), or in private
memory for a local event.  Layout (native byte order)::

    0    pthread_mutex_t   process-shared and robust: a holder that dies cannot wedge others
    64   u32 generation    the futex word: changes on every completion
    68   u32 recorded      the newest sequence number handed out by a record
    72   u32 recorder_pid  who made that record, with its start time and pid namespace
    76   u32 floor         every record up to this number is done, except the stragglers
    80   u64 recorder_start
    88   u64 completed_ns  CLOCK_MONOTONIC when the newest record completed (timing events)
    96   u32 stragglers    how many of the next 8 words hold a number still pending at or
    100  u32[8]            below ``floor`` (a record that fell out of the window, see below)
    132  u32 version       odd while a record rewrites (recorded, recorder): a seqlock
    136  u32 recorder_pidns
    192  u64[256] done     one bit per record in a window of WINDOW numbers above ``floor``

CUDA's rules map onto it directly: a record takes the next number when it is *called*; the
stream marks that number done when the work before it has run; an event is complete when its
newest number is done; a wait or synchronize waits for the number that was newest *as of the
call*, and only for it: a later record that completes first does not release it, and one that
stays pending does not hold it.  A never-recorded event (number 0) is complete.  Numbers are
u32 in serial arithmetic, so they may wrap.

Limits: the bitmap covers :data:`WINDOW` numbers above ``floor``.  When a new record needs the
slot of one still pending, that old record moves to the straggler list and the floor passes
it, so at most :data:`WINDOW` records may be pending within one window and
:data:`STRAGGLERS` far behind it; a record beyond that is refused with
``hipErrorLaunchOutOfResources``.

Who may touch the page: records and completions take the mutex; waiters and queries never do
(they read the newest record through the seqlock), so a stopped or slow recorder cannot stall
a wait past its timeout.  The mutex keeps glibc's robust-list pointers in the page, so a
process that can write the page can corrupt the locking of the others: interprocess events are
therefore never shared beyond the exporter's user (the store refuses other uids), the same
trust boundary as ptrace.  Values read from the page are still checked and every loop over
them is bounded, so a corrupt page gives ``HipError``, not an exception or a hang.

Waiters sleep in ``FUTEX_WAIT`` on ``generation`` (no core burnt, woken by the completer's
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
from ..store import process_alive

__all__ = ["EventState", "STATE_SIZE", "WINDOW", "STRAGGLERS", "LIVENESS_INTERVAL", "Target"]

WINDOW = 16384  # numbers above the floor with a done bit: a 2 KiB bitmap
STRAGGLERS = 8  # pending records that may fall behind the window
LIVENESS_INTERVAL = 0.1  # seconds between checks that a waited-for recorder still runs

_MUTEX_OFFSET = 0
_GENERATION, _RECORDED, _RECORDER_PID, _FLOOR = 64, 68, 72, 76
_RECORDER_START, _COMPLETED_NS, _STRAGGLER_COUNT, _STRAGGLER_LIST = 80, 88, 96, 100
_VERSION, _RECORDER_PIDNS, _DONE_BITS = 132, 136, 192
STATE_SIZE = _DONE_BITS + WINDOW // 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_mutex_lock = _libc.pthread_mutex_lock
_mutex_unlock = _libc.pthread_mutex_unlock
_mutex_consistent = _libc.pthread_mutex_consistent
for _fn in (_mutex_lock, _mutex_unlock, _mutex_consistent):
    _fn.restype = ctypes.c_int
    _fn.argtypes = [ctypes.c_void_p]

# Where the futex syscall number is unknown, waiters poll every 0.5 ms instead of sleeping.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "ppc64le": 221, "s390x": 238,
              "riscv64": 98}.get(platform.machine())
# No FUTEX_PRIVATE_FLAG: the word lives in a shared file mapping, waited on by other processes.
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_INT_MAX = 0x7FFFFFFF
_EOWNERDEAD = 130
_PTHREAD_PROCESS_SHARED, _PTHREAD_MUTEX_ROBUST = 1, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# syscall() is variadic: every argument must be passed with its full C width.
_NR_FUTEX = ctypes.c_long(_SYS_FUTEX or 0)
_OP_WAIT, _OP_WAKE = ctypes.c_long(_FUTEX_WAIT), ctypes.c_long(_FUTEX_WAKE)
_WAKE_ALL, _NULL, _ZERO = ctypes.c_long(_INT_MAX), ctypes.c_void_p(0), ctypes.c_long(0)


def _futex_wait(addr: ctypes.c_void_p, expected: int, seconds: float) -> int:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``seconds``; 0 or errno."""
    if _SYS_FUTEX is None:
        time.sleep(min(seconds, 0.0005))
        return errno.ETIMEDOUT
    ts = _Timespec(int(seconds), int((seconds % 1.0) * 1e9))
    rc = _syscall(_NR_FUTEX, addr, _OP_WAIT, ctypes.c_long(expected), ctypes.byref(ts), _NULL,
                  _ZERO)
    return 0 if rc == 0 else ctypes.get_errno()


def _futex_wake_all(addr: ctypes.c_void_p) -> None:
    if _SYS_FUTEX is not None:
            _syscall(_NR_FUTEX, addr, _OP_WAKE, _WAKE_ALL, _NULL, _NULL, _ZERO)


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


_MASK, _HALF = 0xFFFFFFFF, 0x80000000


def _serial_ge(a: int, b: int) -> bool:
    """``a >= b`` for u32 sequence numbers that may have wrapped."""
    return (a - b) & _MASK < _HALF


Target = tuple[int, int, int, int]
"""What a wait waits for: (sequence number, recorder pid, start time, pid namespace)."""


def _corrupt(what: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidResourceHandle,
                    f"the event's shared state is corrupt ({what}); destroy it and create "
                    "another")


class EventState:
    """The state of one event at ``addr``; ``keepalive`` pins the memory.

    ``initialize=True`` (the creator) sets up the mutex in the new, zeroed memory; openers pass
    False.  Any object that holds this state keeps the memory mapped, so a stream operation
    or a waiter can outlive ``hipEventDestroy`` safely.
    """

    __slots__ = ("addr", "_keepalive", "_mutex", "_generation", "_futex", "_recorded", "_pid",
                 "_floor", "_start", "_pidns", "_version", "_completed_ns", "_nstragglers",
                 "_stragglers", "_done")

    def __init__(self, addr: int, keepalive: Any, *, initialize: bool) -> None:
        self.addr = addr
        self._keepalive = keepalive
        self._mutex = ctypes.c_void_p(addr + _MUTEX_OFFSET)
        self._generation = ctypes.c_uint32.from_address(addr + _GENERATION)
        self._futex = ctypes.c_void_p(addr + _GENERATION)
        self._recorded = ctypes.c_uint32.from_address(addr + _RECORDED)
        self._pid = ctypes.c_uint32.from_address(addr + _RECORDER_PID)
        self._floor = ctypes.c_uint32.from_address(addr + _FLOOR)
        self._start = ctypes.c_uint64.from_address(addr + _RECORDER_START)
        self._pidns = ctypes.c_uint32.from_address(addr + _RECORDER_PIDNS)
        self._version = ctypes.c_uint32.from_address(addr + _VERSION)
        self._completed_ns = ctypes.c_uint64.from_address(addr + _COMPLETED_NS)
        self._nstragglers = ctypes.c_uint32.from_address(addr + _STRAGGLER_COUNT)
        self._stragglers = (ctypes.c_uint32 * STRAGGLERS).from_address(addr + _STRAGGLER_LIST)
        self._done = (ctypes.c_uint64 * (WINDOW // 64)).from_address(addr + _DONE_BITS)
        if initialize:
            _init_mutex(addr + _MUTEX_OFFSET)

    @classmethod
    def private(cls) -> EventState:
        """State in this process's own memory, for an event that is not interprocess."""
        buf = (ctypes.c_uint64 * (STATE_SIZE // 8))()
        return cls(ctypes.addressof(buf), buf, initialize=True)

    # -- the mutex (records and completions only) ------------------------------------------

    def _lock(self) -> None:
        rc = _mutex_lock(self._mutex)
        if rc:
            self._lock_failed(rc)

    def _checked(self) -> tuple[int, int, int]:
        """(floor, recorded, stragglers), checked so that every loop over them is bounded."""
        floor, recorded, count = (self._floor.value, self._recorded.value,
                                  self._nstragglers.value)
        if count > STRAGGLERS or (recorded - floor) & _MASK > WINDOW:
            raise _corrupt(f"recorded {recorded}, floor {floor}, {count} stragglers")
        return floor, recorded, count

    def _lock_failed(self, rc: int) -> None:
        if rc == _EOWNERDEAD:
            # A holder died mid-update (we hold the lock now).  Each field is valid word by
            # word; an unfinished record leaves the seqlock odd, so close it.  A completion it
            # did not finish is never redone: its waiters see the recorder gone and fail.
            _mutex_consistent(self._mutex)
            if self._version.value & 1:
                self._version.value = (self._version.value + 1) & _MASK
            return
        raise HipError(hipError_t.hipErrorOperatingSystem, f"event mutex: {os.strerror(rc)}")

    # -- record / complete -----------------------------------------------------------------

    def reserve(self, pid: int, start: int, pidns: int) -> int:
        """A record: take the next sequence number in the name of process (pid, start, pidns).

        Raises ``hipErrorLaunchOutOfResources`` when the record would exceed the limits
        (module doc); nothing is reserved then.
        """
        self._lock()
        try:
            floor, recorded, _count = self._checked()
            seq = (recorded + 1) & _MASK
            oldest = (seq - WINDOW) & _MASK  # the number whose slot seq takes over
            if not _serial_ge(floor, oldest):
                self._pass_floor_to(oldest)
            self._done[(seq % WINDOW) >> 6] &= ~(1 << (seq & 63))
            version = self._version.value
            self._version.value = (version + 1) & _MASK  # odd: readers retry
            self._pid.value = pid
            self._start.value = start
            self._pidns.value = pidns
            self._recorded.value = seq
            self._version.value = (version + 2) & _MASK
        finally:
            _mutex_unlock(self._mutex)
        return seq

    def _pass_floor_to(self, target: int) -> None:
        """Move the floor up to ``target``; pending numbers on the way become stragglers."""
        floor, _recorded, count = self._checked()
        done = self._done
        pending = []
        while floor != target:  # at most WINDOW steps: checked by the caller
            floor = (floor + 1) & _MASK
            if not done[(floor % WINDOW) >> 6] & (1 << (floor & 63)):
                pending.append(floor)
                if count + len(pending) > STRAGGLERS:
                    raise HipError(
                        hipError_t.hipErrorLaunchOutOfResources,
                        f"too many records of this event are pending ({WINDOW} within one "
                        f"window and {STRAGGLERS} behind it; a recorder may have exited with "
                        "work enqueued): wait for them, or record another event")
        for number in pending:
            self._stragglers[count] = number
            count += 1
        self._nstragglers.value = count
        self._floor.value = floor
        self._advance_floor()

    def _advance_floor(self) -> None:
        """Move the floor up over numbers already done."""
        floor, recorded, _count = self._checked()
        done = self._done
        while floor != recorded:  # at most WINDOW steps: _checked
            nxt = (floor + 1) & _MASK
            if not done[(nxt % WINDOW) >> 6] & (1 << (nxt & 63)):
                break
            floor = nxt
        self._floor.value = floor

    def complete(self, seq: int, timing: bool) -> None:
        """The work before record ``seq`` is done: mark it, advance the floor, wake waiters.

        On the path of every cross-process wake-up, so the common case (the record completes
        in order and is the newest) touches no bitmap word and calls no helper.
        """
        rc = _mutex_lock(self._mutex)  # inline _lock(): this is the hot path
        if rc:
            self._lock_failed(rc)
        try:
            floor, recorded = self._floor.value, self._recorded.value
            if (floor - seq) & _MASK < _HALF:
                if not self._drop_straggler(seq):
                    return  # done already
            elif (recorded - seq) & _MASK >= _HALF:
                raise _corrupt(f"completion of record {seq} beyond the newest, {recorded}")
            elif (seq - floor) & _MASK == 1:
                self._floor.value = seq
                if seq != recorded:
                    self._advance_floor()
            else:
                self._done[(seq % WINDOW) >> 6] |= 1 << (seq & 63)
            if timing and seq == recorded:
                self._completed_ns.value = time.perf_counter_ns()
            self._generation.value = (self._generation.value + 1) & _MASK
        finally:
            _mutex_unlock(self._mutex)
        _futex_wake_all(self._futex)

    def _drop_straggler(self, seq: int) -> bool:
        count = self._nstragglers.value
        if count > STRAGGLERS:
            raise _corrupt(f"{count} stragglers")
        for i in range(count):
            if self._stragglers[i] == seq:
                self._stragglers[i] = self._stragglers[count - 1]
                self._nstragglers.value = count - 1
                return True
        return False

    # -- observe / wait (no lock) ----------------------------------------------------------

    def target(self) -> Target:
        """The newest record as of now, with its recorder: what a wait issued now waits for."""
        version = self._version
        for attempt in range(1000):
            before = version.value
            if not before & 1:
                snapshot = (self._recorded.value, self._pid.value, self._start.value,
                            self._pidns.value)
                if version.value == before:
                    return snapshot
            if attempt > 10:
                time.sleep(0.00005)  # a recorder is mid-update; it takes microseconds
        # A writer stuck mid-update (stopped, or killed before a locker repaired the seqlock):
        # the number is still right; at worst the recorder is misattributed.
        return self._recorded.value, self._pid.value, self._start.value, self._pidns.value

    def is_done(self, seq: int) -> bool:
        """Whether the work of record ``seq`` (handed out already) is done."""
        if _serial_ge(self._floor.value, seq):
            count = self._nstragglers.value
            return not count or seq not in self._stragglers[:min(count, STRAGGLERS)]
        # Above the floor only numbers already handed out have a meaningful bit.
        return bool(self._done[(seq % WINDOW) >> 6] & (1 << (seq & 63)))

    def is_complete(self) -> bool:
        """CUDA's query: the newest record's work is done (or nothing was ever recorded)."""
        return self.is_done(self._recorded.value)

    @property
    def completed_ns(self) -> int:
        return self._completed_ns.value

    def check_recorder(self, target: Target) -> None:
        """Raise ``hipErrorLaunchFailure`` if ``target`` is pending and its recorder has exited."""
        seq, pid, start, pidns = target
        if pid == os.getpid() or self.is_done(seq) or process_alive(pid, start, pidns):
            return
        if self.is_done(seq):  # it completed just before exiting
            return
        raise HipError(hipError_t.hipErrorLaunchFailure,
                       f"process {pid}, which recorded this event, exited before the recorded "
                       "work completed; the event will never complete")

    def wait(self, target: Target, deadline: float | None) -> None:
        """Block until the work of ``target`` is done; GIL released while asleep.

        Raises ``hipErrorNotReady`` when ``deadline`` (``time.monotonic()``) passes first, and
        ``hipErrorLaunchFailure`` (within about :data:`LIVENESS_INTERVAL`) when the recorder
        exits before completing it.
        """
        seq = target[0]
        generation = self._generation
        next_check = time.monotonic() + LIVENESS_INTERVAL
        while True:
            current = generation.value  # read before the check: no completion is missed
            if self.is_done(seq):
                return
            now = time.monotonic()
            if now >= next_check:
                self.check_recorder(target)
                next_check = now + LIVENESS_INTERVAL
            if deadline is not None and now >= deadline:
                raise HipError(hipError_t.hipErrorNotReady,
                               "the event's recorded work did not complete before the timeout")
            limit = next_check if deadline is None else min(next_check, deadline)
            err = _futex_wait(self._futex, current, max(limit - now, 0.0))
            if err not in (0, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise HipError(hipError_t.hipErrorOperatingSystem,
                               f"futex wait failed: {os.strerror(err)}")
