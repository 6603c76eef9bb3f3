"""The per-process registry: what this process allocated, exported and imported.

It answers "which allocation holds this pointer" (interior pointers included), keeps an
import's refcount (CUDA: opening a handle twice gives the same pointer and needs two closes),
and knows which handles are this process's own (opening one is ``hipErrorInvalidContext``).
In-process maps are keyed by :attr:`IpcHandle.segment_name`, a digest, never by the secret.

One registry exists per process (:func:`get_registry`); a forked child starts a fresh one,
so it can import its parent's handles but cannot free its parent's memory.  The child keeps
only the parent's address ranges (plain numbers, no descriptor), so that a parent's pointer
used in the child gets an error that says where it comes from.

Exit rule (CUDA's: a process's memory dies with it).  At a normal exit (the interpreter ends,
``sys.exit``, an exception reaching the top, or a ``multiprocessing`` child finishing) the
registry, in this order: drains its streams (enqueued work still completes), gives the
receivers of its newest send tickets a short grace to open them, unlinks the name
of every export of the process (memory and interprocess events) and every ticket it issued
that no receiver consumed, then removes its store if that left it empty.  Processes that
opened the memory already keep their mappings, as after ``hipFree``.  The hook runs from
``multiprocessing``'s exit function when that module is loaded (after a ``Queue``'s feeder
thread has flushed what was put, so a sent buffer is pickled before it is revoked), else from
``atexit``.  After a kill -9 nothing runs: the store refuses the dead exporter's handles at the
next open and reclaims them (:meth:`HandleStore.open`), and ``hipipc gc`` sweeps the rest.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import os
import sys
import threading
import time
import weakref
from typing import Any

from .backends import BACKEND_ENV, Allocation, Backend, ImportedMemory, Region, create_backend
from .errors import HipError, hipError_t
from .events import Event
from .handle import IpcEventHandle, IpcHandle, IpcMemHandle
from .store import STORE_ENV, HandleStore, share_mode
from .streams import Stream, refuse_on_stream, running_on_stream

__all__ = ["Registry", "get_registry"]

# How long after its newest send ticket an exiting process waits for receivers to consume its
# tickets before the exit rule revokes them (Registry._await_tickets).
TICKET_GRACE = 2.0
# How long the exit rule lets enqueued stream work finish before abandoning it
# (Registry._drain_at_exit).  Read at each exit, so a script (a test) may lower it first.
EXIT_DRAIN = 10.0


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


class Registry:
    """Allocations and imports of one process over one backend.  Thread-safe."""

    def __init__(self, backend: Backend, *, hook_exit: bool = True) -> None:
        self.backend = backend
        self._null = backend.null_stream()  # the backend's, for the life of this registry
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._bases: list[int] = []
        self._regions: dict[int, Region] = {}
        self._own: dict[str, Allocation] = {}  # by segment name, exported or not
        self._imports: dict[str, ImportedMemory] = {}
        # In a forked child: (base, end, pid) of the regions an ancestor held at fork, by base.
        self._inherited: list[tuple[int, int, int]] = []
        self._device = threading.local()
        # Streams stay listed after destroy until drained and their failures reported.
        self._streams: set[Stream] = set()
        # Interprocess events this process created, by segment name, and every event, for
        # fork (an undestroyed event that is dropped destroys itself, so these are weak).
        self._own_events: weakref.WeakValueDictionary[str, Event] = weakref.WeakValueDictionary()
        self._events: weakref.WeakSet[Event] = weakref.WeakSet()
        # Ticket names this process linked in its store (send-and-drop), pruned of consumed
        # ones whenever the set doubles, removed at exit.
        self._tickets: set[str] = set()
        self._ticket_limit = 256
        self._last_ticket = float("-inf")  # time.monotonic() of the newest ticket
        self._exited = False
        if hook_exit:
            self.hook_exit()

    def hook_exit(self) -> None:
        """Make the exit rule run at this process's normal exit (once: call it once)."""
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            # Runs from multiprocessing's exit function (atexit in the main process, called
            # explicitly in its children, forked ones included), after the Queue feeders.
            mp_util.Finalize(None, self._at_exit, exitpriority=-100)
        else:
            atexit.register(self._at_exit)

    # -- devices -------------------------------------------------------------------------

    @property
    def device(self) -> int:
        """This thread's current device (CUDA/HIP: the current device is per thread)."""
        return getattr(self._device, "value", 0)

    def set_device(self, device: int) -> None:
        count = self.backend.device_count()
        if not 0 <= device < count:
            raise HipError(
                hipError_t.hipErrorInvalidDevice,
                f"device {device} does not exist ({count} device(s))",
            )
        self._device.value = device

    # -- lookups -------------------------------------------------------------------------

    def _insert(self, region: Region) -> None:
        bisect.insort(self._bases, region.ptr)
        self._regions[region.ptr] = region
        if self._inherited:  # the address is this process's now, whatever it was at fork
            end = region.ptr + region.size
            i = max(0, bisect.bisect_right(self._inherited, (region.ptr, float("inf"), 0)) - 1)
            j = i
            while j < len(self._inherited) and self._inherited[j][0] < end:
                j += 1
            kept = [r for r in self._inherited[i:j] if r[1] <= region.ptr or r[0] >= end]
            self._inherited[i:j] = kept

    def _not_found(self, ptr: int, what: str) -> HipError:
        """The error for a pointer this process does not hold: a parent's pointer says so."""
        i = bisect.bisect_right(self._inherited, (ptr, float("inf"), 0)) - 1
        if i >= 0 and ptr < self._inherited[i][1]:
            return _invalid(
                f"{ptr:#x} comes from the parent process {self._inherited[i][2]} "
                "(hipMalloc or hipIpcOpenMemHandle there, before fork); a forked "
                "child has its own context: open the parent's hipIpcGetMemHandle "
                "handle with hipIpcOpenMemHandle"
            )
        return _invalid(what)

    def _remove(self, region: Region) -> None:
        del self._regions[region.ptr]
        del self._bases[bisect.bisect_left(self._bases, region.ptr)]

    def find(self, ptr: int) -> tuple[Region, int]:
        """The region holding ``ptr`` and the offset into it; ``hipErrorInvalidValue`` if none."""
        with self._lock:
            i = bisect.bisect_right(self._bases, ptr) - 1
            if i >= 0:
                region = self._regions[self._bases[i]]
                if ptr < region.ptr + region.size:
                    return region, ptr - region.ptr
            raise self._not_found(
                ptr,
                f"{ptr:#x} is not a pointer hipMalloc or "
                "hipIpcOpenMemHandle returned in this process (freed or "
                "closed already?)",
            )

    def check_range(self, ptr: int, nbytes: int) -> tuple[Region, int]:
        """Like :meth:`find`, and ``[ptr, ptr+nbytes)`` must lie inside the region."""
        region, offset = self.find(ptr)
        if offset + nbytes > region.size:
            raise _invalid(
                f"{nbytes} bytes at {ptr:#x} run past the end of its allocation "
                f"({region.size - offset} bytes left)"
            )
        return region, offset

    # -- own memory ----------------------------------------------------------------------

    def allocate(self, nbytes: int, transport: str | None = None) -> int:
        """Allocate on the current device; ``transport`` (``store``, ``fd``, ``auto``)
        overrides the process's ``$HIPIPC_TRANSPORT`` for this allocation."""
        alloc = self.backend.allocate(nbytes, self.device, transport)
        with self._lock:
            self._insert(alloc)
            self._own[alloc.handle.segment_name] = alloc
        return alloc.ptr

    def _own_allocation(self, ptr: int, what: str) -> Allocation:
        region, offset = self.find(ptr)
        if getattr(region, "owner", None) is not None:
            raise _invalid(
                f"{what}: {ptr:#x} is memory-pool memory; share it with "
                "hipMemPoolExportPointer (CUDA refuses IPC handles of pool memory too)"
            )
        if not isinstance(region, Allocation):
            if what == "hipFree":
                raise _invalid(
                    f"hipFree: {ptr:#x} was opened with hipIpcOpenMemHandle; close "
                    "it with hipIpcCloseMemHandle (only the exporter frees it)"
                )
            raise _invalid(
                f"{what}: {ptr:#x} was opened from another process's handle; "
                "only the exporter may do this"
            )
        return region

    def _quiesce(self) -> None:
        """CUDA's implicit synchronization of ``cudaFree``: wait for the work this process has
        enqueued so far, which may still use the memory (a host function holds raw pointers,
        and the null stream is asynchronous), before memory is released.  Failures stay for
        the next synchronize.  Skipped on a stream's own thread, which would wait for itself."""
        if not self._streams and self._null.query():
            return  # the common case: nothing enqueued, no lock, no list
        if running_on_stream() or self._exited:
            # After the exit rule: its drain waited (bounded) already, and the interpreter's
            # finalization (module globals' buffers freed) freezes the daemon stream workers,
            # so waiting for them here would hang the exit forever.
            return
        self._wait_idle(self._all_streams(), None)

    def free(self, ptr: int) -> None:
        self._quiesce()
        with self._lock:
            region, _ = self.find(ptr)
            owner = getattr(region, "owner", None)
        if owner is not None:  # a memory pool's allocation or import (hipipc.poolcore)
            owner.free_pointer(region, ptr, "hipFree")
            return
        with self._lock:
            alloc = self._own_allocation(ptr, "hipFree")
            if alloc.ptr != ptr:
                raise _invalid(
                    f"hipFree: {ptr:#x} points inside an allocation; free its base {alloc.ptr:#x}"
                )
            self._remove(alloc)
            del self._own[alloc.handle.segment_name]
        self.backend.free(alloc)

    def export(self, ptr: int, share: str | None = None) -> IpcMemHandle:
        """The allocation's handle, publishing it on first use (same bytes every time)."""
        with self._lock:
            alloc = self._own_allocation(ptr, "hipIpcGetMemHandle")
            if not alloc.exported:
                self.backend.export(alloc, share_mode(share))
                alloc.exported = True
            return alloc.handle

    def own_pointer(self, handle: IpcMemHandle) -> int | None:
        """The base pointer of this process's live allocation under ``handle``, if any."""
        with self._lock:
            alloc = self._own.get(handle.segment_name)
            return alloc.ptr if alloc is not None else None

    # -- imports -------------------------------------------------------------------------

    def open(self, handle: IpcMemHandle, ticket: bytes | None = None) -> int:
        """Open ``handle`` (through ``ticket``, a pickle's, if given: see :mod:`.buffer`)."""
        name = handle.segment_name
        with self._lock:
            mem = self._imports.get(name)
            if mem is not None:
                if ticket is not None:  # first: a malformed one raises before a reference
                    self.backend.store.consume_ticket(handle, ticket)  # is taken
                mem.refs += 1
                return mem.ptr
            if name in self._own:
                raise HipError(
                    hipError_t.hipErrorInvalidContext,
                    "this process exported the handle; use the pointer itself "
                    "(CUDA and HIP refuse to open a handle in its exporting process)",
                )
            mem = self.backend.open(handle, ticket)
            self._insert(mem)
            self._imports[name] = mem
            return mem.ptr

    def close(self, ptr: int) -> None:
        if self._streams or not self._null.query():  # _quiesce's own fast test, inline
            self._quiesce()
        with self._lock:
            region = self._regions.get(ptr)
            if not isinstance(region, ImportedMemory):
                detail = (
                    f"hipIpcCloseMemHandle: {ptr:#x} is not a pointer "
                    "hipIpcOpenMemHandle returned (or it was closed already)"
                )
                if isinstance(region, Allocation):
                    detail += "; this process allocated it: free it with hipFree"
                raise self._not_found(ptr, detail) if region is None else _invalid(detail)
            region.refs -= 1
            if region.refs:
                return
            self._remove(region)
            del self._imports[region.handle.segment_name]
        self.backend.close(region)

    # -- streams and events --------------------------------------------------------------

    def create_stream(self, blocking: bool = True) -> Stream:
        stream = self.backend.create_stream(self.device, blocking)
        with self._lock:
            self._prune_streams()
            self._streams.add(stream)
        return stream

    def _prune_streams(self) -> None:
        """Forget destroyed streams that have drained and have nothing left to report."""
        self._streams = {s for s in self._streams if not s.finished}

    @staticmethod
    def _wait_idle(streams: list[Stream], timeout: float | None) -> None:
        """Wait for the work enqueued on ``streams``, one deadline for all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for stream in streams:
            if not stream.query():
                stream.wait_idle(
                    None if deadline is None else max(0.0, deadline - time.monotonic())
                )

    def _all_streams(self) -> list[Stream]:
        """The null stream first (its queue orders itself after the blocking streams), then
        every stream not yet pruned, destroyed ones included."""
        with self._lock:
            return [self.backend.null_stream(), *self._streams]

    def synchronize(self, timeout: float | None = None) -> None:
        """``hipDeviceSynchronize``: wait for every stream of this process (one deadline for
        all), then report one failure not reported yet; others wait for the next call."""
        refuse_on_stream("hipDeviceSynchronize")
        streams = self._all_streams()
        self._wait_idle(streams, timeout)
        try:
            for stream in streams:
                stream.report_failure()
        finally:
            with self._lock:
                self._prune_streams()

    def create_event(self, flags: int) -> Event:
        event = self.backend.create_event(flags, self.device)
        self._events.add(event)
        if event.handle is not None:
            self._own_events[event.handle.segment_name] = event
        return event

    def issue_ticket(self, handle: IpcMemHandle | IpcEventHandle) -> bytes:
        """Link a one-time ticket to this process's exported ``handle``; its secret.

        The ticket keeps the segment alive after the export is revoked, until a receiver
        opens through it (and unlinks it) or this process exits.
        """
        with self._lock:
            if len(self._tickets) >= self._ticket_limit:
                # Amortised: forget the tickets receivers consumed, then allow twice as many.
                store = self.backend.store
                self._tickets = {t for t in self._tickets if store.exists(t)}
                self._ticket_limit = max(256, 2 * len(self._tickets))
            secret, name = self.backend.store.issue_ticket(handle)
            self._tickets.add(name)
            self._last_ticket = time.monotonic()
        return secret

    def open_event(self, handle: IpcEventHandle, ticket: bytes | None = None) -> Event:
        if handle.segment_name in self._own_events:
            raise HipError(
                hipError_t.hipErrorInvalidContext,
                "this process created the event; use the event itself (CUDA and "
                "HIP refuse to open a handle in its exporting process)",
            )
        if handle.uid != os.geteuid():
            # A peer could write the event's page and read-lock its file (eventstate.py).
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"the event was exported by uid {handle.uid}; interprocess events "
                "work only between processes of one user (memory handles can be "
                "shared further, see HIPIPC_SHARE)",
            )
        event = self.backend.open_event(handle, ticket)
        self._events.add(event)
        return event

    def own_event(self, handle: IpcEventHandle) -> Event | None:
        """The live interprocess event this process created under ``handle``, if any."""
        return self._own_events.get(handle.segment_name)

    def _drain_at_exit(self, timeout: float | None = None) -> None:
        """At interpreter exit, let enqueued work finish (CUDA's rule: destroy and exit do
        not cancel it), for at most ``timeout`` seconds (default :data:`EXIT_DRAIN`); peers
        may be waiting on its records."""
        if os.getpid() != self._pid:
            return
        if timeout is None:
            timeout = EXIT_DRAIN
        streams = self._all_streams()
        try:
            self._wait_idle(streams, timeout)
        except HipError:
            print(
                f"hipipc: work enqueued on {len(streams)} stream(s) did not finish within "
                f"{timeout:.0f} s of exit; abandoning it",
                file=sys.stderr,
            )

    def _at_exit(self) -> None:
        """The exit rule (module docstring): drain, revoke every export and ticket, remove
        the store if empty.  Once per process; every step is guarded so the others run."""
        if os.getpid() != self._pid or self._exited:
            return
        self._exited = True
        try:
            self._drain_at_exit()
            self._await_tickets()
        except BaseException:  # noqa: BLE001 - a Ctrl-C cuts the waits short, not the rule
            pass
        self.revoke_all()
        with contextlib.suppress(Exception):
            self.backend.store.remove_if_empty()

    def _await_tickets(self) -> None:
        """Before revoking: give the receivers of a pickle sent just before exit (a ``Pool``
        worker returns a buffer and ends, a child puts its result and returns) until
        :data:`TICKET_GRACE` seconds after the newest ticket to open it.  Otherwise the exit
        raced the receiver's unpickling, and ``Pool``'s result thread, which does not survive
        an unpickling error, died and left ``map`` waiting forever.  No wait when no ticket is
        that recent; tickets still unconsumed then are revoked as before."""
        store = self.backend.store
        with self._lock:
            pending = set(self._tickets)
        deadline = self._last_ticket + TICKET_GRACE
        while pending and time.monotonic() < deadline:
            pending = {name for name in pending if store.exists(name)}
            if pending:
                time.sleep(0.005)

    def revoke_all(self) -> None:
        """Unlink the names of every export and unconsumed ticket of this process (the exit
        rule); allocations stay mapped here and in the processes that opened them."""
        store = self.backend.store
        # First: a link made from now on takes itself back (HandleStore._unlink_if_exiting);
        # one made before is listed below (memory and tickets under this lock; events whether
        # or not their export has marked them exported yet: unlinking a name never made is
        # harmless).
        store.exiting = True
        with self._lock:
            handles: list[IpcHandle] = [a.handle for a in self._own.values() if a.exported]
            tickets, self._tickets = self._tickets, set()
        # valuerefs() copies in one C call: iterating values() raised "dictionary changed
        # size" when another thread created or dropped an event meanwhile.
        events = [ref() for ref in self._own_events.valuerefs()]
        handles += [ev.handle for ev in events if ev is not None and ev.handle is not None]
        for handle in handles:
            with contextlib.suppress(Exception):
                store.revoke(handle)
        for name in tickets:
            with contextlib.suppress(Exception):
                store.discard(name)

    # -- process lifetime ----------------------------------------------------------------

    def region_at(self, ptr: int) -> Region | None:
        """The region whose base is ``ptr``, if this process holds one: an object that
        remembers its region can tell whether it was released behind its back
        (``hipDeviceReset``, a bare ``hipFree``) even if a new one took the address since.
        One dict read, atomic under the GIL: no lock on this path."""
        return self._regions.get(ptr)

    def overlaps(self, ptr: int, nbytes: int) -> bool:
        """Whether any region this process holds meets ``[ptr, ptr+nbytes)``."""
        with self._lock:
            i = bisect.bisect_left(self._bases, ptr + nbytes) - 1
            return i >= 0 and self._bases[i] + self._regions[self._bases[i]].size > ptr

    def add_host_range(self, region: Region) -> None:
        """Make pinned or registered host memory addressable by pointer (``asarray``, the
        copy calls) like device memory; it is neither an allocation nor an import, so
        ``hipFree``/``hipIpcGetMemHandle``/``hipIpcCloseMemHandle`` still refuse it.
        ``hipErrorHostMemoryAlreadyRegistered`` if it meets a region held already: the
        table is keyed by base address, and an overlap would shadow (and on removal drop)
        an allocation's entry."""
        with self._lock:
            i = bisect.bisect_left(self._bases, region.ptr + region.size) - 1
            if i >= 0 and self._bases[i] + self._regions[self._bases[i]].size > region.ptr:
                raise HipError(
                    hipError_t.hipErrorHostMemoryAlreadyRegistered,
                    f"[{region.ptr:#x}, +{region.size}) is device, pinned or "
                    "registered memory already",
                )
            self._insert(region)

    def remove_host_range(self, region: Region) -> None:
        with self._lock:
            if self._regions.get(region.ptr) is region:
                self._remove(region)

    def regions_on(self, device: int) -> list[Region]:
        """This process's allocations and imports on ``device`` (for ``hipDeviceReset``)."""
        with self._lock:
            return [r for r in self._regions.values() if r.device == device]

    def live_counts(self) -> tuple[int, int]:
        """(allocations, imports) currently held."""
        with self._lock:
            return len(self._own), len(self._imports)

    def forget_all(self) -> list[tuple[int, int, int]]:
        """In a forked child: drop the parent's descriptors, keep its memory untouched.

        Returns the address ranges the parent held (with those it inherited), for the child's
        registry to recognize the parent's pointers by; the child's null stream is fresh.
        Never fails halfway: the fork may have caught another thread of the parent inside a
        call, so each step tolerates what it left (a descriptor closed already, a lock held),
        and one object's failure does not keep the others from being forgotten.
        """
        self._lock = threading.RLock()  # the parent's other threads may have held it
        inherited = self._inherited + [
            (r.ptr, r.ptr + r.size, self._pid) for r in self._regions.values()
        ]
        objects: list[Any] = [
            *self._regions.values(),
            self.backend.null_stream(),
            *self._streams,
            *self._events,
        ]
        for obj in objects:
            try:
                if isinstance(obj, Region):
                    self.backend.forget(obj)
                else:
                    obj.forget()
            except Exception:  # a descriptor leaked in the child is harmless
                continue
        store = getattr(self.backend, "store", None)
        if store is not None:
            try:
                store.forget()
            except Exception:  # as above
                pass
        self._streams = set()
        self._own_events = weakref.WeakValueDictionary()
        self._events = weakref.WeakSet()
        self._regions = {}
        self._bases = []
        self._own = {}
        self._imports = {}
        self._tickets = set()  # the parent's: it removes them at its exit
        self._exited = True  # this registry is the parent's; the child makes its own
        return sorted(inherited)


_registry: Registry | None = None
_registry_lock = threading.Lock()
_inherited: list[tuple[int, int, int]] = []  # ancestors' address ranges, in a forked child


def get_registry() -> Registry:
    """This process's registry, created on first use with ``$HIPIPC_BACKEND`` (over
    ``$HIPIPC_STORE``): the one built at import if those still read the same."""
    global _registry
    reg = _registry
    if reg is None:
        with _registry_lock:
            if _registry is None:
                new = _take_spare() or Registry(create_backend(HandleStore()), hook_exit=False)
                new._inherited = list(_inherited)
                new.hook_exit()
                _registry = new
            reg = _registry
    return reg


# A registry built at import, with no exit hook yet: the first call adopts it (issue 15's
# cold path: building one costs a first call ~100 us of cold Python).  It holds no
# descriptor, thread or file (the store opens its directory on first use), so one never
# adopted costs nothing but memory.  Adopted only while the environment variables it was
# built from still read the same, in the process that built it: a program (or the test
# suite's conftest) may set $HIPIPC_STORE after import and before its first call.
_spare: tuple[tuple[int, str | None, str | None], Registry] | None = None


def _spare_key() -> tuple[int, str | None, str | None]:
    return os.getpid(), os.environ.get(STORE_ENV), os.environ.get(BACKEND_ENV)


def _make_spare() -> None:
    global _spare
    try:
        key = _spare_key()
        _spare = key, Registry(create_backend(HandleStore()), hook_exit=False)
    except Exception:  # $HIPIPC_BACKEND names no backend, ...: the first call says so
        _spare = None


def _take_spare() -> Registry | None:
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare[0] == _spare_key():
        return spare[1]
    return None


# How long fork waits for another thread to finish its registry call before forking anyway
# (the child then copes with a call caught midway: forget_all tolerates it).
_FORK_LOCK_WAIT = 5.0
# The locks the forking thread holds across fork (per thread: two threads may fork at once).
_fork_locks = threading.local()


def _before_fork() -> None:
    """Hold the registry's and its store's locks across fork, so that no other thread is
    inside an export, import or free when the child is made: the child never inherits a
    half-done one.  Same order as every call takes them (registry, then store)."""
    held: list[Any] = []  # the registry's RLock, the store's lock
    _fork_locks.held = held
    reg = _registry
    if reg is None:
        return
    for lock in (reg._lock, getattr(reg.backend.store, "_lock", None)):
        if lock is not None and lock.acquire(timeout=_FORK_LOCK_WAIT):
            held.append(lock)


def _after_fork_in_parent() -> None:
    held = getattr(_fork_locks, "held", [])
    _fork_locks.held = []
    for lock in reversed(held):
        lock.release()


def _after_fork_in_child() -> None:
    """The child starts a fresh registry: it can import its parent's handles but cannot
    free, export or close its parent's memory.  Never fails halfway: the registry is reset in
    ``finally`` whatever forgetting the parent's objects raised."""
    global _registry, _registry_lock, _inherited, _spare
    _spare = None  # the parent's (its pid): never adopted here
    reg, _registry = _registry, None
    _registry_lock = threading.Lock()
    _fork_locks.held = []  # the child's copies die with the old registry
    try:
        if reg is not None:
            _inherited = reg.forget_all()
    except Exception:  # hooks never raise; the child's registry is fresh anyway
        pass
    finally:
        _registry = None


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
_make_spare()
