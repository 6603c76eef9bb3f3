"""The engine behind :mod:`hipipc.mempool`: one memory pool is one sealed memfd.

The pool file's layout (a header page, the allocation table, the data), the checks an
importer makes on it and the importers' leases are :mod:`hipipc.poolfile`'s; this module is
the pool object: the allocator, exports and imports of pointers, freeing and destruction.

The exporter maps the whole file once; an allocation is a page-aligned range of it, committed
with :func:`hipipc.memfd.reserve` (``posix_fallocate``: a full memory is
``hipErrorOutOfMemory`` at allocation, never SIGBUS later) and entered in this process's
registry as device memory (``hipMemcpy``, ``asarray``, ``hipPointerGetAttributes`` work on
it).  Freed ranges stay committed while the pool's reserved memory (live allocations included)
is within its release threshold; beyond it they are given back to the kernel with
``fallocate(PUNCH_HOLE)`` (allowed under the shrink/grow seals).

An importer maps the file once :func:`hipipc.poolfile.check_pool_file` accepted it; everything
it reads from the file afterwards, the table included, is hostile input.  Export data
(64 bytes) names a table slot; the importer reads that entry once and accepts the pointer only
if the entry matches the export data exactly, lies in the pool and is live.  The pool identity
is compared in constant time.

Leases (:mod:`hipipc.poolfile`): the exporter clears a freed allocation's table entry, then
tests for an importer's lease before it puts the range back in the free list; a leased range
is held aside and looked at again at the next allocation or trim.  So an imported pointer
keeps its memory and its contents until the importer frees it or exits (the kernel drops OFD
locks with the description), also after the exporter freed it (CUDA: undefined), destroyed
the pool or exited.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hmac
import os
import resource
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from .backends import Region
from .errors import HipError, hipError_t
from .mapping import Mapping, map_file
from .memfd import create_memfd, reserve

# The file format and its checks; the `X as X` names are not used here but stay importable
# from hipipc.poolcore, as before poolfile was split out of it (tests use them).
from .poolfile import (
    _DATA_OFFSET,
    _ENTRY,
    _EXPORT,
    _EXPORT_MAGIC,
    _HEADER,
    _LIVE,
    _MAGIC,
    _TABLE_OFFSET,
    _VERSION,
    CAPACITY,
    EXPORT_SIZE,
    PAGE,
    _invalid,
    _lease,
    _leased,
    _pages,
    _private_description,
    _take_lease,
    check_pool_file,
)
from .poolfile import _F_OFD_GETLK as _F_OFD_GETLK
from .poolfile import _F_OFD_SETLK as _F_OFD_SETLK
from .poolfile import _FLOCK as _FLOCK
from .poolfile import _WRITE_SEALS as _WRITE_SEALS
from .registry import get_registry
from .store import _os_call
from .streams import running_on_stream

__all__ = ["MemPool", "PoolRegion", "EXPORT_SIZE"]

# How long an allocation that finds the pool full waits for hipFreeAsync calls still queued
# on streams before it gives up with hipErrorOutOfMemory (see MemPool.allocate).
REUSE_WAIT = 10.0

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def default_max_size() -> int:
    """A pool's size when ``maxSize`` is 0 (HIP: "a system dependent value"): the physical
    memory, as a GPU pool may grow to the device's memory, but at most a quarter of the
    address space ``RLIMIT_AS`` allows (the pool is mapped whole).  Address space until used."""
    try:
        size = os.sysconf("SC_PHYS_PAGES") * PAGE
    except (ValueError, OSError):
        size = 1 << 34
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        size = min(size, limit // 4)
    return max(PAGE, size // PAGE * PAGE)


class _Slice:
    """A pool allocation's view of the pool mapping: the ``buffer``/``pin`` interface the host
    backend uses for ``asarray`` and the copy calls, with offsets relative to the allocation."""

    __slots__ = ("mapping", "base", "length")

    def __init__(self, mapping: Mapping, base: int, length: int) -> None:
        self.mapping, self.base, self.length = mapping, base, length

    def _check(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise _invalid("view outside the pool allocation")

    def buffer(self, offset: int, nbytes: int) -> Any:
        self._check(offset, nbytes)
        return self.mapping.buffer(self.base + offset, nbytes)

    def pin(self, offset: int, nbytes: int) -> Any:
        self._check(offset, nbytes)
        return self.mapping.pin(self.base + offset, nbytes)


@dataclass(eq=False)
class PoolRegion(Region):
    """A pool allocation (or, in an importer, an imported pool pointer) in the registry.

    ``owner`` makes ``hipFree`` hand it back to its pool (:meth:`Registry.free`);
    ``is_device_memory`` makes ``hipPointerGetAttributes`` report it as device memory."""

    owner: Any = None
    offset: int = 0
    length: int = 0
    slot: int = -1
    serial: int = 0
    refs: int = 1
    freed: bool = field(default=False, repr=False)
    is_device_memory = True


def _subtract(ranges: list[list[int]], off: int, end: int) -> int:
    """Remove ``[off, end)`` from the sorted, disjoint ``ranges`` (in place); bytes removed."""
    removed = 0
    out: list[list[int]] = []
    for lo, hi in ranges:
        if hi <= off or lo >= end:
            out.append([lo, hi])
            continue
        removed += min(hi, end) - max(lo, off)
        if lo < off:
            out.append([lo, off])
        if hi > end:
            out.append([end, hi])
    ranges[:] = out
    return removed


def _insert(ranges: list[list[int]], off: int, end: int) -> None:
    """Add ``[off, end)`` to the sorted, disjoint ``ranges``, coalescing neighbours."""
    i = 0
    while i < len(ranges) and ranges[i][1] < off:
        i += 1
    lo, hi = off, end
    j = i
    while j < len(ranges) and ranges[j][0] <= hi:
        lo, hi = min(lo, ranges[j][0]), max(hi, ranges[j][1])
        j += 1
    ranges[i:j] = [[lo, hi]]


class MemPool:
    """A memory pool (``hipMemPool_t``): created here (:meth:`_create`) or imported
    (:meth:`_import_fd`).  Thread-safe; every method raises :class:`HipError` with HIP's code.
    The hip* calls of :mod:`hipipc.mempool` are its interface."""

    # Declared here because instances are built by _new (object.__new__, no __init__), where
    # mypy does not look for attributes; _new sets every one of them.
    device: int
    ipc: bool
    imported: bool
    is_default: bool
    _lock: threading.Lock
    _released: threading.Condition
    _pending: int  # hipFreeAsync calls enqueued, not yet run (see defer)
    _pid: int
    destroyed: bool
    _closed: bool
    _finalizer: weakref.finalize[Any, Any] | None
    _fd: int
    _mapping: Mapping | None
    pool_id: bytes
    file_size: int
    live: dict[int, PoolRegion]  # by pointer
    _imports: dict[tuple[int, int], PoolRegion]  # (slot, serial), importer
    _free: list[list[int]]
    _cached: list[list[int]]  # free but still committed
    _cached_bytes: int
    _held: list[tuple[int, int]]  # freed here, still leased by an importer
    _lease_fd: int  # importer: its own open file description of the pool
    _slots: list[int]
    _serial: int
    used: int
    used_high: int
    reserved_high: int
    release_threshold: int
    reuse: dict[int, int]  # the three hipMemPoolReuse* switches
    access: dict[int, int]  # device -> hipMemAccessFlags, besides the owner

    def __init__(self) -> None:
        raise TypeError("use hipMemPoolCreate or hipMemPoolImportFromShareableHandle")

    @classmethod
    def _new(cls, device: int, ipc: bool, imported: bool, default: bool) -> MemPool:
        self = object.__new__(cls)
        self.device, self.ipc, self.imported, self.is_default = device, ipc, imported, default
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._pending = 0  # hipFreeAsync calls enqueued, not yet run (see defer)
        self._pid = os.getpid()
        self.destroyed = False
        self._closed = False
        self._finalizer = None
        self._fd = -1
        self._mapping = None
        self.pool_id = b""
        self.file_size = 0
        self.live = {}  # by pointer
        self._imports = {}  # (slot, serial), importer
        self._free = []
        self._cached = []  # free but still committed
        self._cached_bytes = 0
        self._held = []  # freed here, still leased by an importer
        self._lease_fd = -1  # importer: its own open file description of the pool
        self._slots = []
        self._serial = 0
        self.used = self.used_high = self.reserved_high = 0
        self.release_threshold = 0
        self.reuse = {1: 1, 2: 1, 3: 1}  # the three hipMemPoolReuse* switches
        self.access = {}  # device -> hipMemAccessFlags, besides the owner
        _pools.add(self)
        return self

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def _create(cls, device: int, ipc: bool, max_size: int, default: bool = False) -> MemPool:
        self = cls._new(device, ipc, False, default)
        data = _pages(max_size) if max_size else _pages(default_max_size())
        size = _DATA_OFFSET + data
        fd = create_memfd(size, commit=False)
        try:
            reserve(fd, 0, _DATA_OFFSET)  # header and table: written without a fault risk
            self.pool_id = secrets.token_bytes(16)
            header = _HEADER.pack(
                _MAGIC, _VERSION, CAPACITY, device, size, _DATA_OFFSET, self.pool_id
            )
            os.pwrite(fd, header, 0)
            self._mapping = map_file(fd, size, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.file_size = fd, size
        self._finalizer = weakref.finalize(self, _cleanup, fd, self._mapping)
        # Not at exit: stream work still draining then may use the memory; exit frees it.
        self._finalizer.atexit = False
        self._free = [[_DATA_OFFSET, size]]
        self._slots = list(range(CAPACITY - 1, -1, -1))
        return self

    @classmethod
    def _import_fd(cls, fd: int) -> MemPool:
        """Map the pool behind another process's shareable handle ``fd`` (not consumed)."""
        st, device, size, pool_id = check_pool_file(fd)
        self = cls._new(device, True, True, False)
        self.pool_id, self.file_size = pool_id, size
        lease_fd = _private_description(fd, st)  # first: it may fail (descriptor limit)
        try:
            self._mapping = map_file(fd, size, 0)  # the fd is the caller's; the map needs none
        except BaseException:
            if lease_fd >= 0:
                os.close(lease_fd)
            raise
        self._lease_fd = lease_fd
        self._finalizer = weakref.finalize(self, _cleanup, self._lease_fd, self._mapping)
        # Not at exit: stream work still draining then may use the memory; exit frees it.
        self._finalizer.atexit = False
        return self

    # -- exporter side ---------------------------------------------------------------------

    def _usable(self, what: str) -> None:
        if self.destroyed or os.getpid() != self._pid:
            raise _invalid(f"{what}: the pool was destroyed (or belongs to the parent process)")

    def allocate(self, nbytes: int) -> int:
        """A new allocation of ``nbytes`` (> 0); its pointer.  ``hipErrorOutOfMemory`` when
        the pool's size, its table or the memory is exhausted.

        A pool full only of memory that ``hipFreeAsync`` calls still queued on streams will
        give back: CUDA reuses it in stream order (``hipMallocAsync`` right after
        ``hipFreeAsync`` on one stream always succeeds), inserting a stream dependency if
        needed (``hipMemPoolReuseAllowInternalDependencies``).  Here an allocation is usable at
        once, so the caller waits for those frees instead, up to :data:`REUSE_WAIT` seconds
        (not on a stream's own thread, which could wait for itself)."""
        length = _pages(nbytes)
        with self._lock:
            self._usable("allocation")
            if self.imported:
                raise _invalid("an imported pool cannot allocate (CUDA/HIP: only its exporter can)")
            off = self._fit_locked(length)
            end_wait = None
            while (off is None or (self.ipc and not self._slots)) and self._pending:
                if running_on_stream() or not self.reuse[3]:
                    break
                if end_wait is None:
                    end_wait = time.monotonic() + REUSE_WAIT
                left = end_wait - time.monotonic()
                if left <= 0:
                    break
                self._released.wait(left)
                self._usable("allocation")  # destroyed (or forked) meanwhile
                off = self._fit_locked(length)
            if off is None:
                raise HipError(
                    hipError_t.hipErrorOutOfMemory,
                    f"the pool has no free range of {length} bytes left "
                    f"({self.file_size - _DATA_OFFSET} bytes, maxSize)",
                )
            if self.ipc and not self._slots:
                raise HipError(
                    hipError_t.hipErrorOutOfMemory,
                    f"the pool holds {CAPACITY} live allocations, its limit",
                )
            end = off + length
            if not self._covered(off, end):
                reserve(self._fd, off, length)  # hipErrorOutOfMemory when memory is full
            self._cached_bytes -= _subtract(self._cached, off, end)
            _subtract(self._free, off, end)
            slot = self._slots.pop() if self.ipc else -1
            self._serial += 1
            assert self._mapping is not None
            region = PoolRegion(
                self._mapping.addr + off,
                nbytes,
                self.device,
                None,  # type: ignore[arg-type]  # no IPC handle: see hipMemPoolExportPointer
                _Slice(self._mapping, off, length),
                owner=self,
                offset=off,
                length=length,
                slot=slot,
                serial=self._serial,
            )
            if slot >= 0:
                self._write_entry(slot, _ENTRY.pack(off, nbytes, self._serial, _LIVE))
            self.used += length
            self.used_high = max(self.used_high, self.used)
            self.reserved_high = max(self.reserved_high, self.used + self._cached_bytes)
            self.live[region.ptr] = region
        try:
            get_registry().add_host_range(region)
        except BaseException:
            self._give_back(region)
            raise
        return region.ptr

    def _fit_locked(self, length: int) -> int | None:
        """The first free range of ``length`` bytes (held ranges let go first), or None."""
        if self._held:
            self._requeue_locked()
        return next((lo for lo, hi in self._free if hi - lo >= length), None)

    def _covered(self, off: int, end: int) -> bool:
        return any(lo <= off and end <= hi for lo, hi in self._cached)

    def _write_entry(self, slot: int, entry: bytes) -> None:
        os.pwrite(self._fd, entry, _TABLE_OFFSET + slot * _ENTRY.size)

    def export_pointer(self, region: PoolRegion) -> bytes:
        """The 64-byte export data of ``region`` (this process's live allocation)."""
        if not self.ipc or self.imported:
            raise _invalid(
                "hipMemPoolExportPointer: the allocation's pool was not created with "
                "hipMemHandleTypePosixFileDescriptor"
                if not self.ipc
                else "hipMemPoolExportPointer: an imported pointer cannot be exported again"
            )
        return _EXPORT.pack(
            _EXPORT_MAGIC,
            _VERSION,
            region.slot,
            region.offset,
            region.size,
            region.serial,
            self.pool_id,
            bytes(8),
        )

    def shareable_fd(self) -> int:
        """A new close-on-exec descriptor of the pool's memfd, the caller's to close."""
        with self._lock:
            self._usable("hipMemPoolExportToShareableHandle")
            if not self.ipc or self.imported:
                raise _invalid(
                    "hipMemPoolExportToShareableHandle: the pool was not created with "
                    "hipMemHandleTypePosixFileDescriptor"
                    if not self.ipc
                    else "hipMemPoolExportToShareableHandle: an imported pool cannot be "
                    "exported again"
                )
            # At the fd limit: raised toward the hard limit, else hipErrorOutOfMemory naming it.
            return _os_call("exporting a memory pool", os.dup, self._fd)

    # -- importer side ---------------------------------------------------------------------

    def import_pointer(self, data: bytes) -> int:
        """Map the allocation that ``data`` (export data, untrusted) names; its pointer."""
        magic, version, slot, off, size, serial, pool_id, tail = _EXPORT.unpack(data)
        if magic != _EXPORT_MAGIC or version != _VERSION or any(tail):
            raise _invalid("hipMemPoolImportPointer: not hipMemPoolExportPointer data")
        with self._lock:
            self._usable("hipMemPoolImportPointer")
            if not self.imported:
                raise _invalid(
                    "hipMemPoolImportPointer needs a pool from "
                    "hipMemPoolImportFromShareableHandle (the exporter uses its pointer)"
                )
            if not hmac.compare_digest(pool_id, self.pool_id):
                raise _invalid("hipMemPoolImportPointer: the export data names another pool")
            length = _pages(size)
            if (
                not 0 <= slot < CAPACITY
                or size == 0
                or off % PAGE
                or off < _DATA_OFFSET
                or off + length > self.file_size
            ):
                raise _invalid("hipMemPoolImportPointer: the export data is out of range")
            key = (slot, serial)
            known = self._imports.get(key)
            if known is not None and not known.freed:
                known.refs += 1
                return known.ptr
            assert self._mapping is not None
            if any(
                r.offset < off + length and off < r.offset + r.length for r in self.live.values()
            ):
                raise _invalid(
                    "hipMemPoolImportPointer: the range overlaps a pointer imported "
                    "already (free it first)"
                )
            # The lease first, then the entry: an exporter that frees meanwhile either sees
            # the lease (and keeps the range for us) or cleared the entry before we read it.
            leased = self._lease_fd >= 0
            if leased:
                _take_lease(self._lease_fd, off, length)
            # One read of the entry (a copy): the exporter, or anyone holding the pool's
            # descriptor, may write it meanwhile; a torn read just fails the comparison.
            at = self._mapping.addr + _TABLE_OFFSET + slot * _ENTRY.size
            entry = ctypes.string_at(at, _ENTRY.size)
            if entry != _ENTRY.pack(off, size, serial, _LIVE):
                if leased:
                    _lease(self._lease_fd, off, length, fcntl.F_UNLCK)
                raise _invalid(
                    "hipMemPoolImportPointer: the allocation is not live in its pool "
                    "(freed by the exporter, or the export data was altered)"
                )
            region = PoolRegion(
                self._mapping.addr + off,
                size,
                self.device,
                None,  # type: ignore[arg-type]
                _Slice(self._mapping, off, length),
                owner=self,
                offset=off,
                length=length,
                slot=slot,
                serial=serial,
            )
            self._imports[key] = region
            self.live[region.ptr] = region
        try:
            get_registry().add_host_range(region)
        except BaseException:
            self._give_back(region)
            raise
        return region.ptr

    # -- freeing ---------------------------------------------------------------------------

    def free_pointer(self, region: PoolRegion, ptr: int, what: str) -> None:
        """``hipFree`` of a pool pointer: released now (the caller waited for the streams)."""
        if ptr != region.ptr:
            raise _invalid(f"{what}: {ptr:#x} points inside a pool allocation; free its base")
        if self.take(region, what):
            self._give_back(region)

    def take(self, region: PoolRegion, what: str) -> bool:
        """Claim ``region`` for freeing: out of the registry at once (later calls refuse the
        pointer).  False when this was one of several imports of the same pointer."""
        with self._lock:
            if region.freed or self.live.get(region.ptr) is not region:
                raise _invalid(f"{what}: {region.ptr:#x} was freed already")
            if region.refs > 1:
                region.refs -= 1
                return False
            region.freed = True
        get_registry().remove_host_range(region)
        return True

    def defer(self) -> None:
        """Count a taken region whose :meth:`release` is now queued on a stream: allocations
        that find the pool full wait for it (see :meth:`allocate`)."""
        with self._lock:
            self._pending += 1

    def release(self, region: PoolRegion) -> None:
        """Return a taken, deferred ``region`` to the pool (the stream-ordered part of a
        free).  Never raises: it runs on a stream's thread, where nobody could handle it."""
        try:
            self._give_back(region)
        except Exception:  # a failed hole punch leaves memory committed, nothing worse
            pass
        finally:
            with self._lock:
                self._pending -= 1
                self._released.notify_all()

    def _give_back(self, region: PoolRegion) -> None:
        with self._lock:
            self.live.pop(region.ptr, None)
            region.freed = True
            if self.imported:
                self._imports.pop((region.slot, region.serial), None)
                if self._lease_fd >= 0:
                    _lease(self._lease_fd, region.offset, region.length, fcntl.F_UNLCK)
            elif not self._closed:
                if region.slot >= 0:
                    self._write_entry(region.slot, bytes(_ENTRY.size))  # before the test
                    self._slots.append(region.slot)
                if region.slot >= 0 and _leased(self._fd, region.offset, region.length):
                    # An importer still maps it (CUDA: undefined; here its contents stay the
                    # importer's until it frees it or exits): not reused or released yet.
                    self._held.append((region.offset, region.length))
                else:
                    self._reuse_locked(region.offset, region.length)
            close = self.destroyed and not self.live
        if close:
            self._close()

    def _reuse_locked(self, off: int, length: int) -> None:
        _insert(self._free, off, off + length)
        _insert(self._cached, off, off + length)
        self._cached_bytes += length
        self.used -= length
        # CUDA/HIP: the threshold bounds the reserved memory, live allocations included.
        self._trim_locked(max(0, self.release_threshold - self.used))

    def _requeue_locked(self) -> None:
        """Make the held ranges whose importers have let go free again."""
        held, self._held = self._held, []
        for off, length in held:
            if _leased(self._fd, off, length):
                self._held.append((off, length))
            else:
                self._reuse_locked(off, length)

    def _refresh(self) -> None:
        """Let go of held ranges whose importers have freed them (for the attributes)."""
        with self._lock:
            if self._held and not self._closed:
                self._requeue_locked()

    def trim(self, keep: int) -> None:
        """``hipMemPoolTrimTo``: release free memory until at most ``keep`` bytes beyond the
        live allocations stay reserved (CUDA: the pool keeps at least ``keep`` bytes)."""
        with self._lock:
            self._usable("hipMemPoolTrimTo")
            if not self.imported:
                if self._held:
                    self._requeue_locked()
                self._trim_locked(max(0, keep - self.used))

    def _trim_locked(self, keep_cached: int) -> None:
        while self._cached_bytes > keep_cached and self._cached:
            lo, hi = self._cached.pop()  # highest addresses first: first fit reuses the low
            excess = self._cached_bytes - keep_cached
            cut = max(lo, hi - _pages(excess))
            if cut > lo:
                self._cached.append([lo, cut])
            if _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, cut, hi - cut):
                err = ctypes.get_errno()
                if cut > lo:
                    self._cached.pop()
                self._cached.append([lo, hi])
                raise HipError(
                    hipError_t.hipErrorOperatingSystem,
                    f"cannot release pool memory: {os.strerror(err or errno.EIO)}",
                )
            self._cached_bytes -= hi - cut

    @property
    def reserved(self) -> int:
        return self.used + self._cached_bytes

    # -- destruction -----------------------------------------------------------------------

    def destroy(self) -> None:
        """``hipMemPoolDestroy``: no new allocations; the memory goes when the last live
        allocation (or import) of the pool is freed, at once if there is none (HIP's rule)."""
        with self._lock:
            if self.destroyed:
                raise _invalid("hipMemPoolDestroy: the pool was destroyed already")
            if self.is_default:
                raise _invalid("hipMemPoolDestroy: a device's default pool cannot be destroyed")
            self.destroyed = True
            close = not self.live
            self._released.notify_all()  # allocations waiting for queued frees: refused now
        if close:
            self._close()

    def _close(self) -> None:
        """Unmap (once no numpy view pins the mapping) and close the memfd.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._fd = self._fd, -1
            if fd < 0:  # an imported pool: its lease description
                fd, self._lease_fd = self._lease_fd, -1
            mapping, self._mapping = self._mapping, None
            if self._finalizer is not None:
                self._finalizer.detach()
        _cleanup(fd, mapping)
        _pools.discard(self)

    def forget(self) -> None:
        """In a forked child: the parent's pool, unusable here; drop the descriptor."""
        self.destroyed = True
        self._closed = True
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._pending = 0
        if self._finalizer is not None:
            self._finalizer.detach()
        for fd in (self._fd, self._lease_fd):  # the child's copies; the parent's own
            if fd >= 0:  # reference keeps its leases
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._lease_fd = -1


def _cleanup(fd: int, mapping: Mapping | None) -> None:
    """Release a pool's mapping (unmapped once no view pins it) and close its memfd; also
    run when a pool object is dropped without hipMemPoolDestroy.  Never raises."""
    try:
        if mapping is not None:
            mapping.release()
        if fd >= 0:
            os.close(fd)
    except OSError:
        pass


# Every pool of this process (destroyed pools leave once closed), for fork.
_pools: weakref.WeakSet[MemPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        try:
            pool.forget()
        except Exception:  # a descriptor leaked in the child is harmless
            continue
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
