"""The state of a host event: sequence numbers in (shared) memory, a futex, a kernel-held lock.

One :class:`EventState` is :data:`STATE_SIZE` bytes at a fixed address: in a store segment for
an interprocess event (every process that opened the handle maps the same page), or in private
memory for a local event.  Layout (native byte order)::

    0    (64 bytes)        unused (held a pthread mutex in earlier versions; never read)
    64   u32 generation    the futex word: the number of the latest completion
    68   u32 recorded      the newest sequence number handed out by a record
    72   u32 recorder_pid  who made that record, with its start time and pid namespace
    76   u32 floor         every record up to this number is done, except the stragglers
    80   u64 recorder_start
    88   u64 completed_ns  CLOCK_MONOTONIC when the newest record completed (timing events)
    96   u32 stragglers    how many of the next 8 words hold a number still pending at or
    100  u32[8]            below ``floor`` (a record that fell out of the window, see below)
    132  u32 version       odd while a record rewrites (recorded, recorder): a seqlock
    136  u32 recorder_pidns
    192  u32[4096] done   slot n % WINDOW holds n once record n is done (numbers above
                           the floor; a slot holds the newest number completed in it)

CUDA's rules map onto it directly: a record takes the next number when it is *called*; the
stream marks that number done when the work before it has run; an event is complete when its
newest number is done; a wait or synchronize waits for the number that was newest *as of the
call*, and only for it: a later record that completes first does not release it, and one that
stays pending does not hold it.  A never-recorded event (number 0) is complete.  Numbers are
u32 in serial arithmetic, so they may wrap.

Limits: the done slots cover :data:`WINDOW` numbers above ``floor``.  A record moves the floor
up to the number whose slot it takes over; a number still pending there moves to the
straggler list, so at most :data:`WINDOW` records may be pending within one window and
:data:`STRAGGLERS` far behind it; a record beyond that is refused with
``hipErrorLaunchOutOfResources``.

The lock (records, and completions off the common path): no lock state lives in the page,
because any process of the user can write the page and a lock word there could be forged (a
process-shared pthread mutex there made a record abort on a glibc assertion, or hang on a lock
word naming a thread that never unlocks).  Python has no atomic compare-and-swap, so a
futex-word mutex cannot be taken from Python either.  The lock is therefore held outside the
page:

* a per-state ``threading.Lock`` orders the threads of one process;
* for an interprocess event, an open-file-description lock (``F_OFD_SETLK``, a write lock on
  byte 0 of the event's segment file) orders processes.  The kernel keeps it, no byte of the
  page can corrupt it, and it is released when the holder's last descriptor of that open file
  closes, so a holder that dies never wedges the others (owner-death recovery for free; an
  update it left half done is caught by the checks below, or read as a pending record of a
  dead recorder: ``hipErrorLaunchFailure``).

Cost: every process that uses an interprocess event keeps one descriptor of its segment open
(the creator a duplicate of its segment descriptor, each opener the one it opened), closed when
the state is dropped (destroy, plus the end of enqueued work that still holds it).  A forked
child shares its parent's open file descriptions, and with them any OFD lock the parent holds:
so after fork (``os.register_at_fork``) a state reopens its file through ``/proc/self/fd`` (a
new open file description) and makes a new ``threading.Lock`` before its next lock.  A private
event needs only the ``threading.Lock``.

Every acquisition is bounded by :data:`LOCK_TIMEOUT`: ``F_OFD_SETLKW`` has no timeout, so a
contended lock is polled with a short backoff (critical sections take microseconds).  A
holder stopped (debugger, SIGSTOP) past the bound makes a record raise
``hipErrorLaunchTimeOut`` (nothing reserved).  A locked completion that cannot get the lock
raises the same code into its stream's failure report, and first marks the page corrupt (one
aligned store of an impossible straggler count), so that waiters everywhere fail with
``hipErrorInvalidResourceHandle`` instead of waiting for a completion that was lost.

Completions take no lock in the common case, because the lock costs a syscall (the old mutex
did not) and the completion is on the path of every cross-process wake-up.  A completion of a
record among the newest :data:`_LOCKLESS_SPAN` stores its number in its own done slot and in
``generation`` (plain aligned u32 stores, never read-modify-write: the generation takes the
completed number, distinct for every completion, so a waiter's ``FUTEX_WAIT`` on the value it
read cannot miss a completion), then wakes.  Records write the slots' owners' numbers, never
the slots, and only a record moves the floor, under the lock: if the floor passed the number
between the completion's check and its store (thousands of records later), the completion
sees it on a second read of ``recorded`` and finishes under the lock (it drops the number
from the straggler list).  Older records, stragglers and the newest record of a timing event
complete under the lock.  Limit: a completer paused between its check and its store while
``WINDOW - _LOCKLESS_SPAN`` newer records are made and the one taking its slot completes
would overwrite that completion (a wait for it then ends only by timeout or the recorder's
exit).

Shared values are hostile input.  Every function reads each value it needs from the page once
into a local, validates it, then uses the local; every loop is bounded by a validated local.
Any byte pattern gives ``hipErrorInvalidResourceHandle`` ("the event's shared state is
corrupt") or works.  Waiters and queries take no lock (they read the newest record through the
seqlock, so a stopped or slow recorder cannot stall a wait past its timeout), and validate too:
before sleeping and on every liveness check they check the page's counters and the awaited
record's recorder (pid 0, a pid above ``pid_max`` and one of 2**31 or more are no process).  A
record made by a process of another pid namespace cannot be checked for liveness: a wait with
a timeout is bounded by it, a wait without one (``hipEventSynchronize()`` with no timeout,
``hipStreamWaitEvent``) is refused at once with ``hipErrorInvalidResourceHandle``.  A record
that names this very process but that none of its streams still holds can never complete:
refused the same way.  What a page cannot be checked for: it can claim that a live recorder's
work is still pending, exactly like work that legitimately never finishes (as in CUDA: pass a
timeout).

Waiters sleep in ``FUTEX_WAIT`` on ``generation`` (no core burnt, woken by the completer's
``FUTEX_WAKE``) in slices of :data:`LIVENESS_INTERVAL`; between slices a waiter checks that the
process which made the record it waits for still runs.  If that process exited before the work
completed, the wait raises ``hipErrorLaunchFailure`` instead of hanging forever.

The wake-up path is kept short on both sides, because on a busy machine every Python step after
a sleep runs from cold caches: a completion is a few stores and one ``FUTEX_WAKE`` made inline
with the GIL held (no lock, no helper frame); a waiter validates and prepares everything before
it sleeps (the target, the page, the timeout, the address of the record's done slot), and once
``FUTEX_WAIT`` returns woken it reads that slot once and returns if it holds the number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import threading
import time
import weakref
from typing import Any

from ..errors import HipError, hipError_t
from ..store import own_process, process_alive

__all__ = [
    "EventState",
    "STATE_SIZE",
    "WINDOW",
    "STRAGGLERS",
    "LIVENESS_INTERVAL",
    "LOCK_TIMEOUT",
    "Target",
]

WINDOW = 4096  # numbers above the floor with a done slot: 16 KiB of u32
_LOCKLESS_SPAN = 256  # a completion this close to the newest record takes no lock
STRAGGLERS = 8  # pending records that may fall behind the window
LIVENESS_INTERVAL = 0.1  # seconds between checks that a waited-for recorder still runs
LOCK_TIMEOUT = 5.0  # seconds a record or completion waits for the event's lock

_GENERATION, _RECORDED, _RECORDER_PID, _FLOOR = 64, 68, 72, 76
_RECORDER_START, _COMPLETED_NS, _STRAGGLER_COUNT, _STRAGGLER_LIST = 80, 88, 96, 100
_VERSION, _RECORDER_PIDNS, _DONE = 132, 136, 192
STATE_SIZE = _DONE + 4 * WINDOW

_LIBC_NAME = ctypes.util.find_library("c") or "libc.so.6"
_libc = ctypes.CDLL(_LIBC_NAME, use_errno=True)
_syscall = _libc.syscall  # releases the GIL: for FUTEX_WAIT, which blocks
_syscall.restype = ctypes.c_long
# FUTEX_WAKE never blocks: called with the GIL held (PyDLL), so that a completing stream worker
# does not hand the GIL to another thread between its stores and its wake.
_wake_syscall = ctypes.PyDLL(_LIBC_NAME).syscall
_wake_syscall.restype = ctypes.c_long

# Where the futex syscall number is unknown, waiters poll every 0.5 ms instead of sleeping.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "ppc64le": 221, "s390x": 238, "riscv64": 98}.get(
    platform.machine()
)
# No FUTEX_PRIVATE_FLAG: the word lives in a shared file mapping, waited on by other processes.
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_INT_MAX = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# syscall() is variadic: every argument must be passed with its full C width.  Only the
# arguments the operation reads are passed (each costs a conversion on the wake-up path):
# FUTEX_WAIT reads (uaddr, op, val, timeout), FUTEX_WAKE (uaddr, op, val); the kernel ignores
# uaddr2 for both and replaces val3 with FUTEX_BITSET_MATCH_ANY (futex(2), do_futex).
_NR_FUTEX = ctypes.c_long(_SYS_FUTEX or 0)
_OP_WAIT, _OP_WAKE = ctypes.c_long(_FUTEX_WAIT), ctypes.c_long(_FUTEX_WAKE)
_WAKE_ALL = ctypes.c_long(_INT_MAX)


def _futex_wake_all(addr: ctypes.c_void_p) -> None:
    if _SYS_FUTEX is not None:
        _wake_syscall(_NR_FUTEX, addr, _OP_WAKE, _WAKE_ALL)


# -- the interprocess lock: an OFD lock on byte 0 of the segment file -----------------------

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux's value; Python >= 3.9 names it


class _Flock(ctypes.Structure):  # struct flock, laid out by the C compiler's rules
    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]  # 0: required for OFD locks


_WRLCK = bytes(_Flock(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
_UNLCK = bytes(_Flock(fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0))
_BUSY = (errno.EAGAIN, errno.EACCES)

# Bumped in a forked child: a state made before the fork reopens its lock before using it.
_fork_epoch = 0
_fork_lock = threading.Lock()


class _Pending(set[int]):
    """Numbers this process reserved on one event and has not completed (add/discard are
    atomic under the GIL); shared by every state of this process that maps the same segment."""


# (st_dev, st_ino) of an event's segment -> its _Pending, while a state of it lives.
_pending_by_segment: weakref.WeakValueDictionary[tuple[int, int], _Pending]
_pending_by_segment = weakref.WeakValueDictionary()
_pending_lock = threading.Lock()


def _pending_for(fd: int) -> _Pending:
    if fd < 0:
        return _Pending()
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise HipError(
            hipError_t.hipErrorOperatingSystem, f"cannot stat the event's segment: {exc.strerror}"
        ) from exc
    with _pending_lock:
        pending = _pending_by_segment.get((st.st_dev, st.st_ino))
        if pending is None:
            pending = _pending_by_segment[(st.st_dev, st.st_ino)] = _Pending()
    return pending


def _after_fork_in_child() -> None:  # cannot fail: plain assignments
    global _fork_epoch, _fork_lock, _pending_lock, _pending_by_segment
    _fork_epoch += 1
    _fork_lock = threading.Lock()
    _pending_lock = threading.Lock()
    _pending_by_segment = weakref.WeakValueDictionary()  # the parent's records are not ours


os.register_at_fork(after_in_child=_after_fork_in_child)


def _lock_timeout(holder: str) -> HipError:
    return HipError(
        hipError_t.hipErrorLaunchTimeOut,
        f"the event's lock stayed taken for {LOCK_TIMEOUT} s by {holder} (stopped "
        "or in a debugger?); nothing was recorded, try again",
    )


# -- validation ------------------------------------------------------------------------------

_MASK, _HALF = 0xFFFFFFFF, 0x80000000
_POISON = _MASK  # a straggler count no valid page has: marks the page corrupt for everyone
_PID_MAX_LIMIT = 1 << 22  # the kernel's hard limit (PID_MAX_LIMIT on 64-bit)
_pid_max = 0  # /proc/sys/kernel/pid_max, read when first needed


def _valid_pid(pid: int) -> bool:
    """Whether ``pid`` (any u32) can name a process: 1..pid_max (never 0, never >= 2**31)."""
    global _pid_max
    if not 0 < pid <= _PID_MAX_LIMIT:
        return False
    if pid > _pid_max:  # read once, and again if it seems raised since
        try:
            with open("/proc/sys/kernel/pid_max", "rb") as f:
                _pid_max = min(int(f.read()), _PID_MAX_LIMIT)
        except (OSError, ValueError):
            _pid_max = _PID_MAX_LIMIT
    return pid <= _pid_max


def _serial_ge(a: int, b: int) -> bool:
    """``a >= b`` for u32 sequence numbers that may have wrapped."""
    return (a - b) & _MASK < _HALF


Target = tuple[int, int, int, int]
"""What a wait waits for: (sequence number, recorder pid, start time, pid namespace)."""


def _corrupt(what: str) -> HipError:
    return HipError(
        hipError_t.hipErrorInvalidResourceHandle,
        f"the event's shared state is corrupt ({what}); destroy it and create another",
    )


def _check_counters(floor: int, recorded: int, count: int) -> None:
    """Raise unless (floor, recorded, stragglers) bound every loop over them."""
    if count > STRAGGLERS or (recorded - floor) & _MASK > WINDOW:
        raise _corrupt(f"recorded {recorded}, floor {floor}, {count} stragglers")


class EventState:
    """The state of one event at ``addr``; ``keepalive`` pins the memory.

    ``fd`` (interprocess events) is a descriptor of the segment file, opened for writing: the
    state owns it from now on and closes it when dropped; -1 for private memory.  The memory
    is zeroed by its creator, which is a valid state (nothing recorded).  Any object that holds
    this state keeps the memory mapped and the descriptor open, so a stream operation or a
    waiter can outlive ``hipEventDestroy`` safely.
    """

    __slots__ = (
        "addr",
        "shared",
        "_keepalive",
        "_fd",
        "_tlock",
        "_epoch",
        "_mine",
        "_lost",
        "_generation",
        "_futex",
        "_recorded",
        "_pid",
        "_floor",
        "_start",
        "_pidns",
        "_version",
        "_completed_ns",
        "_nstragglers",
        "_stragglers",
        "_done",
    )

    def __init__(self, addr: int, keepalive: Any, fd: int = -1) -> None:
        # Records of this process not yet completed.  First: on failure the caller keeps fd.
        self._mine = _pending_for(fd)
        self.addr = addr
        self._keepalive = keepalive
        self._fd = fd
        self.shared = fd >= 0  # other processes may map (and write) this state
        self._tlock = threading.Lock()
        self._epoch = _fork_epoch
        self._lost: HipError | None = None  # why a completion of ours failed
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
        self._done = (ctypes.c_uint32 * WINDOW).from_address(addr + _DONE)

    @classmethod
    def private(cls) -> EventState:
        """State in this process's own memory, for an event that is not interprocess."""
        buf = (ctypes.c_uint64 * (STATE_SIZE // 8))()
        return cls(ctypes.addressof(buf), buf)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)  # -1 too when __init__ failed before taking it
        self._fd = -1
        if fd >= 0:
            try:
                os.close(fd)  # releases our OFD lock, if an exception left it taken
            except Exception:  # destructors never raise
                pass

    # -- the lock (records and completions only; module doc) -------------------------------

    def _lock(self) -> None:
        """Take the event's lock within :data:`LOCK_TIMEOUT`, or raise (nothing held)."""
        if self._epoch != _fork_epoch:
            self._after_fork()
        if not self._tlock.acquire(timeout=LOCK_TIMEOUT):
            raise _lock_timeout("another thread of this process")
        if self._fd >= 0:
            try:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, _WRLCK)
            except OSError as exc:
                try:
                    self._lock_contended(exc)
                except BaseException:
                    self._tlock.release()
                    raise

    def _lock_contended(self, exc: OSError) -> None:
        """Poll the OFD lock with a short backoff until :data:`LOCK_TIMEOUT`."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.00002
        while True:
            if exc.errno not in _BUSY:
                raise HipError(
                    hipError_t.hipErrorOperatingSystem,
                    f"cannot lock the event's segment: {exc.strerror}",
                )
            if time.monotonic() >= deadline:
                raise _lock_timeout("another process")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
            try:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, _WRLCK)
                return
            except OSError as again:
                exc = again

    def _unlock(self) -> None:
        try:
            if self._fd >= 0:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, _UNLCK)
        finally:
            self._tlock.release()

    def _after_fork(self) -> None:
        """In a forked child: a new thread lock, and a new open file description (the
        inherited one is shared with the parent, and so is any OFD lock the parent holds)."""
        with _fork_lock:
            if self._epoch == _fork_epoch:
                return  # another thread of the child did it
            fd = self._fd
            if fd >= 0:
                try:
                    new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise HipError(
                        hipError_t.hipErrorOperatingSystem,
                        f"cannot reopen the event's segment after fork: {exc.strerror}",
                    ) from exc
                self._fd = new
                os.close(fd)  # the parent's descriptor keeps its lock (if any) its own
            self._tlock = threading.Lock()  # another thread may have held it at fork time
            self._mine = _pending_for(self._fd)  # the parent's pending records are not ours
            self._epoch = _fork_epoch

    # -- record / complete -----------------------------------------------------------------

    def reserve(self, pid: int, start: int, pidns: int) -> int:
        """A record: take the next sequence number in the name of process (pid, start, pidns).

        Raises ``hipErrorLaunchOutOfResources`` when the record would exceed the limits,
        ``hipErrorLaunchTimeOut`` when the lock stays taken past :data:`LOCK_TIMEOUT`, and
        ``hipErrorInvalidResourceHandle`` on a corrupt page (module doc); nothing is reserved
        then.  Every reserved number must be passed to :meth:`complete`.
        """
        self._lock()
        try:
            floor, recorded, count = (
                self._floor.value,
                self._recorded.value,
                self._nstragglers.value,
            )
            _check_counters(floor, recorded, count)
            seq = (recorded + 1) & _MASK
            oldest = (seq - WINDOW) & _MASK  # the number whose slot seq takes over
            if not _serial_ge(floor, oldest):
                self._pass_floor_to(oldest, floor, count)
            version = self._version.value
            self._version.value = (version + 1) & _MASK  # odd: readers retry
            self._pid.value = pid
            self._start.value = start
            self._pidns.value = pidns
            self._recorded.value = seq
            self._version.value = (version + 2) & _MASK
            self._mine.add(seq)
        finally:
            self._unlock()
        return seq

    def _pass_floor_to(self, target: int, floor: int, count: int) -> None:
        """Move the floor up to ``target``; pending numbers on the way become stragglers.

        ``floor`` and ``count`` are the caller's validated reads: ``target - floor`` is at most
        WINDOW.  In steady state the floor moves one number per record."""
        done = self._done
        pending = []
        for _ in range((target - floor) & _MASK):
            floor = (floor + 1) & _MASK
            if done[floor % WINDOW] != floor:
                pending.append(floor)
                if count + len(pending) > STRAGGLERS:
                    raise HipError(
                        hipError_t.hipErrorLaunchOutOfResources,
                        f"too many records of this event are pending ({WINDOW} within one "
                        f"window and {STRAGGLERS} behind it; a recorder may have exited with "
                        "work enqueued): wait for them, or record another event",
                    )
        for number in pending:
            self._stragglers[count] = number
            count += 1
        self._nstragglers.value = count
        self._floor.value = floor

    def complete(self, seq: int, timing: bool) -> None:
        """The work before record ``seq`` is done: mark it and wake waiters.

        On the path of every cross-process wake-up, so the common case (the record is among
        the newest :data:`_LOCKLESS_SPAN`) takes no lock and makes no syscall but the wake:
        it stores ``seq`` in its own slot (one aligned u32 store, which no other writer
        touches while the floor is far: see the module doc) and in ``generation``.  A record
        the floor may pass meanwhile, a straggler, or a timing event's newest record is
        completed under the lock.  On failure the page is marked corrupt so that no waiter
        waits for this number forever.
        """
        try:
            if timing or (self._recorded.value - seq) & _MASK >= _LOCKLESS_SPAN:
                self._complete_locked(seq, timing)
            else:
                self._done[seq % WINDOW] = seq
                # Read again after the store: a floor that passed seq meanwhile (thousands of
                # records later) may have made it a straggler, which only the lock removes.
                if (self._recorded.value - seq) & _MASK >= _LOCKLESS_SPAN:
                    self._complete_locked(seq, timing)
            self._generation.value = seq  # each number is completed once: a distinct value
            # Always woken, inline: skipping the wake when no waiter registered would need an
            # atomic read-modify-write here (Python has none; through ctypes it is one more
            # foreign call), which costs the path of every wake-up more than it saves.
            if _SYS_FUTEX is not None:
                _wake_syscall(_NR_FUTEX, self._futex, _OP_WAKE, _WAKE_ALL)
        finally:
            self._mine.discard(seq)

    def _complete_locked(self, seq: int, timing: bool) -> None:
        try:
            self._lock()
        except HipError as exc:
            self._lose(exc)
            raise
        try:
            floor, recorded = self._floor.value, self._recorded.value
            if (recorded - floor) & _MASK > WINDOW:
                raise _corrupt(f"recorded {recorded}, floor {floor}")
            if (recorded - seq) & _MASK >= _HALF:
                raise _corrupt(f"completion of record {seq} beyond the newest, {recorded}")
            if timing and seq == recorded:
                # Before the slot: whoever sees the record done must find its time stored.
                self._completed_ns.value = time.perf_counter_ns()
            if _serial_ge(floor, seq):
                self._drop_straggler(seq)  # absent: the floor passed it done
            else:
                self._done[seq % WINDOW] = seq
        except HipError as exc:
            self._lose(exc)
            raise
        finally:
            self._unlock()

    def _lose(self, exc: HipError) -> None:
        """A completion failed: its number will never be done.  Mark the page corrupt (one
        aligned u32 store, made without the lock if the lock timed out) and wake waiters."""
        self._lost = exc
        self._nstragglers.value = _POISON
        self._generation.value = (self._generation.value ^ _HALF) & _MASK
        _futex_wake_all(self._futex)

    def _drop_straggler(self, seq: int) -> bool:
        count = self._nstragglers.value
        if count > STRAGGLERS:
            raise _corrupt(f"{count} stragglers")
        stragglers = self._stragglers
        for i in range(count):
            if stragglers[i] == seq:
                stragglers[i] = stragglers[count - 1]
                self._nstragglers.value = count - 1
                return True
        return False

    # -- observe / wait (no lock) ----------------------------------------------------------

    def target(self) -> Target:
        """The newest record as of now, with its recorder: what a wait issued now waits for.

        Raises ``hipErrorInvalidResourceHandle`` when the page is corrupt."""
        version = self._version
        for attempt in range(1000):
            before = version.value
            if not before & 1:
                snapshot = (
                    self._recorded.value,
                    self._pid.value,
                    self._start.value,
                    self._pidns.value,
                )
                if version.value == before:
                    break
            if attempt > 10:
                time.sleep(0.00005)  # a recorder is mid-update; it takes microseconds
        else:
            # A writer stuck mid-update (stopped, or killed mid-record): the number is still
            # right; at worst the recorder is misattributed.
            snapshot = (self._recorded.value, self._pid.value, self._start.value, self._pidns.value)
        if self.shared:  # private memory has no other writer
            self._check_page(snapshot[0])
        return snapshot

    def _check_page(self, seq: int) -> None:
        """Raise unless the page's counters are consistent with a wait for ``seq``, read
        after ``seq`` was: the floor and the newest number only move up, and the floor never
        falls more than WINDOW behind the newest number."""
        floor, recorded, count = (self._floor.value, self._recorded.value, self._nstragglers.value)
        if count > STRAGGLERS:
            raise _corrupt(f"{count} stragglers")
        if (recorded - seq) & _MASK >= _HALF:
            raise _corrupt(f"the newest record, {recorded}, is older than {seq}")
        ahead = (seq - floor) & _MASK
        if WINDOW < ahead < _HALF:
            raise _corrupt(f"record {seq} is {ahead} above the floor, {floor}")

    def is_done(self, seq: int) -> bool:
        """Whether the work of record ``seq`` (handed out already) is done."""
        if _serial_ge(self._floor.value, seq):
            count = self._nstragglers.value
            if not count:
                return True
            if count > STRAGGLERS:
                raise _corrupt(f"{count} stragglers")
            return seq not in self._stragglers[:count]
        # Above the floor a slot holds the newest number completed in it.
        return self._done[seq % WINDOW] == seq

    def is_complete(self) -> bool:
        """CUDA's query: the newest record's work is done (or nothing was ever recorded)."""
        return self.is_done(self._recorded.value)

    @property
    def completed_ns(self) -> int:
        return self._completed_ns.value

    def check_target(self, target: Target, *, bounded: bool) -> None:
        """Raise ``hipErrorInvalidResourceHandle`` if a wait for the pending ``target`` could
        never end: a corrupt page, a recorder that names no possible process, a record of
        this process that none of its streams holds, or (``bounded`` False: a wait without
        timeout) a recorder of another pid namespace, whose exit cannot be detected.  Cheap:
        reads no file."""
        seq, pid, start, pidns = target
        self._check_page(seq)
        if not _valid_pid(pid):
            raise _corrupt(f"record {seq} names process {pid}")
        own = own_process()
        if pid == own[0] and start == own[1] and pidns == own[2]:
            if seq not in self._mine and not self.is_done(seq):
                # Every record we reserved has completed (or failed): this one never will.
                raise self._lost or _corrupt(f"record {seq} is not pending in this process")
        elif pidns and own[2] and pidns != own[2] and not bounded:
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"the event's pending record was made by process {pid} of another "
                "pid namespace, whose exit cannot be detected from here: wait with "
                "a timeout",
            )

    def check_recorder(self, target: Target, *, bounded: bool = True) -> None:
        """:meth:`check_target`, then raise ``hipErrorLaunchFailure`` if ``target`` is
        pending and its recorder has exited."""
        if self.is_done(target[0]):
            return
        self.check_target(target, bounded=bounded)
        seq, pid, start, pidns = target
        if (pid, start, pidns) == own_process() or process_alive(pid, start, pidns):
            return
        if self.is_done(seq):  # it completed just before exiting
            return
        raise HipError(
            hipError_t.hipErrorLaunchFailure,
            f"process {pid}, which recorded this event, exited before the recorded "
            "work completed; the event will never complete",
        )

    def wait(self, target: Target, deadline: float | None) -> None:
        """Block until the work of ``target`` is done; GIL released while asleep.

        Raises ``hipErrorNotReady`` when ``deadline`` (``time.monotonic()``) passes first,
        ``hipErrorLaunchFailure`` (within about :data:`LIVENESS_INTERVAL`) when the recorder
        exits before completing it, and ``hipErrorInvalidResourceHandle`` when the wait could
        never end (:meth:`check_target`; checked before the first sleep and on every liveness
        check).
        """
        seq = target[0]
        if self.is_done(seq):
            return
        bounded = deadline is not None
        self.check_target(target, bounded=bounded)  # a wait that could never end fails now
        # Everything a wake-up needs is prepared before sleeping: woken, the waiter reads the
        # record's own done slot once and returns (the slot holds seq only once seq is done;
        # anything else, a forged value included, goes round the validating loop again).
        slot = ctypes.c_uint32.from_address(self.addr + _DONE + 4 * (seq % WINDOW))
        futex, generation = self._futex, self._generation
        next_check = time.monotonic() + LIVENESS_INTERVAL
        while True:
            current = generation.value  # read before the check: no completion is missed
            if self.is_done(seq):
                return
            now = time.monotonic()
            if now >= next_check:
                self.check_recorder(target, bounded=bounded)
                next_check = now + LIVENESS_INTERVAL
            if deadline is not None and now >= deadline:
                raise HipError(
                    hipError_t.hipErrorNotReady,
                    "the event's recorded work did not complete before the timeout",
                )
            limit = next_check if deadline is None else min(next_check, deadline)
            seconds = max(limit - now, 0.0)
            if _SYS_FUTEX is None:  # no futex here: poll
                time.sleep(min(seconds, 0.0005))
                continue
            ts = ctypes.byref(_Timespec(int(seconds), int((seconds % 1.0) * 1e9)))
            expected = ctypes.c_long(current)
            if _syscall(_NR_FUTEX, futex, _OP_WAIT, expected, ts) == 0:
                if slot.value == seq:
                    return  # woken, and done: nothing else between the wake and the return
                continue
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise HipError(
                    hipError_t.hipErrorOperatingSystem, f"futex wait failed: {os.strerror(err)}"
                )
