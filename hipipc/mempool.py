"""Memory pools: HIP's (and CUDA's) stream-ordered allocator, with IPC.

``hipMallocAsync`` / ``hipMallocFromPoolAsync`` allocate from a pool and ``hipFreeAsync`` gives
the memory back when the stream reaches the free.  A pool created with
``handleTypes = hipMemHandleTypePosixFileDescriptor`` can be shared: its shareable handle is a
POSIX file descriptor (``hipMemPoolExportToShareableHandle``) that another process receives over
a UNIX socket (:func:`hipipc.transport.send_fds` / :func:`~hipipc.transport.recv_fds`) and
imports (``hipMemPoolImportFromShareableHandle``); each allocation is then shared by 64 bytes of
export data (``hipMemPoolExportPointer`` → ``hipMemPoolImportPointer``), the pattern of
cuda-samples' ``streamOrderedAllocationIPC``.  The engine (one sealed memfd per pool, its
allocation table, the checks on untrusted export data) is :mod:`hipipc.poolcore`.

HIP's rules kept here (ROCm 6.2 documentation and hip-tests):

- allocation happens at the call (the memory is usable at once, which is a valid order for
  any stream); ``hipFreeAsync`` removes the pointer at once (later calls refuse it) and
  returns the range to the pool when the stream reaches the free; ``hipFree`` of a pool
  pointer frees it synchronously; ``hipFreeAsync(0)`` does nothing, a second free raises
  ``hipErrorInvalidValue``;
- an importer frees its imported pointers with ``hipFree``/``hipFreeAsync`` (CUDA: "The
  pointer may be freed with cudaFree or cudaFreeAsync"), before the exporter frees them
  (if the exporter frees first, the importer keeps the memory and its contents until it frees
  it or exits: see the leases in :mod:`hipipc.poolcore`);
- ``hipMemPoolDestroy`` of a pool with live allocations or imports succeeds at once and the
  memory goes when the last of them is freed; a device's default pool cannot be destroyed;
- imported pools cannot allocate, be exported again or become a device's current pool.

Host backend: every "device" is the same address space, so access flags
(``hipMemPoolSetAccess``) are recorded and reported but restrict nothing.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import HipError, hipError_t, short_repr
from .poolcore import EXPORT_SIZE, MemPool, PoolRegion
from .registry import get_registry
from .runtime import _count, _integer, _pointer, _stream
from .streams import Stream

__all__ = [
    "hipMemAllocationType",
    "hipMemAllocationHandleType",
    "hipMemLocationType",
    "hipMemAccessFlags",
    "hipMemPoolAttr",
    "hipMemLocation",
    "hipMemAccessDesc",
    "hipMemPoolProps",
    "hipMemPoolPtrExportData",
    "hipMemPool_t",
    "hipMemAllocationTypePinned",
    "hipMemHandleTypeNone",
    "hipMemHandleTypePosixFileDescriptor",
    "hipMemLocationTypeDevice",
    "hipMemAccessFlagsProtNone",
    "hipMemAccessFlagsProtRead",
    "hipMemAccessFlagsProtReadWrite",
    "hipMemPoolAttrReleaseThreshold",
    "hipMemPoolCreate",
    "hipMemPoolDestroy",
    "hipDeviceGetDefaultMemPool",
    "hipDeviceGetMemPool",
    "hipDeviceSetMemPool",
    "hipMallocAsync",
    "hipMallocFromPoolAsync",
    "hipFreeAsync",
    "hipMemPoolTrimTo",
    "hipMemPoolSetAttribute",
    "hipMemPoolGetAttribute",
    "hipMemPoolSetAccess",
    "hipMemPoolGetAccess",
    "hipMemPoolExportToShareableHandle",
    "hipMemPoolImportFromShareableHandle",
    "hipMemPoolExportPointer",
    "hipMemPoolImportPointer",
]


class hipMemAllocationType(enum.IntEnum):
    """``hipMemPoolProps.allocType``, HIP's values; pools take ``Pinned`` only."""

    hipMemAllocationTypeInvalid = 0
    hipMemAllocationTypePinned = 1
    hipMemAllocationTypeMax = 0x7FFFFFFF


class hipMemAllocationHandleType(enum.IntEnum):
    """Shareable handle types (bit flags), HIP's values; the host backend has POSIX fds."""

    hipMemHandleTypeNone = 0
    hipMemHandleTypePosixFileDescriptor = 1
    hipMemHandleTypeWin32 = 2
    hipMemHandleTypeWin32Kmt = 4


class hipMemLocationType(enum.IntEnum):
    hipMemLocationTypeInvalid = 0
    hipMemLocationTypeDevice = 1


class hipMemAccessFlags(enum.IntEnum):
    hipMemAccessFlagsProtNone = 0
    hipMemAccessFlagsProtRead = 1
    hipMemAccessFlagsProtReadWrite = 3


class hipMemPoolAttr(enum.IntEnum):
    """``hipMemPoolSetAttribute``/``GetAttribute`` attributes, HIP's (and CUDA's) values."""

    hipMemPoolReuseFollowEventDependencies = 1
    hipMemPoolReuseAllowOpportunistic = 2
    hipMemPoolReuseAllowInternalDependencies = 3
    hipMemPoolAttrReleaseThreshold = 4
    hipMemPoolAttrReservedMemCurrent = 5
    hipMemPoolAttrReservedMemHigh = 6
    hipMemPoolAttrUsedMemCurrent = 7
    hipMemPoolAttrUsedMemHigh = 8


hipMemAllocationTypePinned = hipMemAllocationType.hipMemAllocationTypePinned
hipMemHandleTypeNone = hipMemAllocationHandleType.hipMemHandleTypeNone
hipMemHandleTypePosixFileDescriptor = hipMemAllocationHandleType.hipMemHandleTypePosixFileDescriptor
hipMemLocationTypeDevice = hipMemLocationType.hipMemLocationTypeDevice
hipMemAccessFlagsProtNone = hipMemAccessFlags.hipMemAccessFlagsProtNone
hipMemAccessFlagsProtRead = hipMemAccessFlags.hipMemAccessFlagsProtRead
hipMemAccessFlagsProtReadWrite = hipMemAccessFlags.hipMemAccessFlagsProtReadWrite
hipMemPoolAttrReleaseThreshold = hipMemPoolAttr.hipMemPoolAttrReleaseThreshold

hipMemPool_t = MemPool
_A = hipMemPoolAttr


@dataclass
class hipMemLocation:
    type: int = hipMemLocationType.hipMemLocationTypeInvalid
    id: int = 0


@dataclass
class hipMemAccessDesc:
    location: hipMemLocation = field(default_factory=hipMemLocation)
    flags: int = hipMemAccessFlagsProtNone


@dataclass
class hipMemPoolProps:
    """``hipMemPoolProps`` (HIP 6.2's fields); zero-initialized like ``hipMemPoolProps{}``.

    ``maxSize`` 0 means "system dependent": the physical memory size (address space only
    until used).  ``win32SecurityAttributes`` must be None and ``reserved`` zero."""

    allocType: int = hipMemAllocationType.hipMemAllocationTypeInvalid
    handleTypes: int = hipMemHandleTypeNone
    location: hipMemLocation = field(default_factory=hipMemLocation)
    win32SecurityAttributes: Any = None
    maxSize: int = 0
    reserved: bytes = bytes(56)


class hipMemPoolPtrExportData:
    """64 opaque bytes naming one allocation of an IPC pool (``hipMemPoolPtrExportData``).

    ``bytes(data)`` gives them; any 64-byte bytes-like object is accepted back (ported code
    keeps them in a shared struct).  Compared by value; the bytes hold no secret (the pool's
    descriptor is the capability) but are checked as untrusted input on import."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise _invalid(f"hipMemPoolPtrExportData needs 64 bytes, not {short_repr(raw)}")
        data = bytes(raw)
        if len(data) != EXPORT_SIZE:
            raise _invalid(f"hipMemPoolPtrExportData is {EXPORT_SIZE} bytes, got {len(data)}")
        self._raw = data

    @property
    def reserved(self) -> bytes:
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, hipMemPoolPtrExportData) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __reduce__(self) -> tuple[Any, ...]:
        return (hipMemPoolPtrExportData, (self._raw,))

    def __repr__(self) -> str:
        return f"hipMemPoolPtrExportData({self._raw[:8]!r}...)"


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


# -- per-device pools (process-local) ------------------------------------------------------

_lock = threading.Lock()
_defaults: dict[int, MemPool] = {}
_current: dict[int, MemPool] = {}


def _device_count() -> int:
    return get_registry().backend.device_count()


def _pool(pool: Any, what: str) -> MemPool:
    if not isinstance(pool, MemPool):
        raise _invalid(f"{what} needs a pool (hipMemPool_t), not {short_repr(pool)}")
    return pool


def _device(device: Any, what: str, code: hipError_t = hipError_t.hipErrorInvalidDevice) -> int:
    n = _integer(device, f"{what} device", code)
    count = _device_count()
    if not 0 <= n < count:
        raise HipError(code, f"{what}: device {n} does not exist ({count} device(s))")
    return n


def _location(loc: Any, what: str, id_code: hipError_t) -> int:
    """The device a ``hipMemLocation`` names (type Device); ``id_code`` for a bad id."""
    if not isinstance(loc, hipMemLocation):
        raise _invalid(f"{what} needs a hipMemLocation, not {short_repr(loc)}")
    if _integer(loc.type, f"{what} location type") != hipMemLocationTypeDevice:
        raise _invalid(f"{what}: the location type must be hipMemLocationTypeDevice")
    return _device(loc.id, what, id_code)


def _host_only(what: str) -> None:
    """Pools are memfds mapped here: host-backend memory only (a GPU backend would map them
    to its own stream-ordered allocator)."""
    backend = get_registry().backend.name
    if backend != "host":
        raise HipError(
            hipError_t.hipErrorNotSupported, f"{what}: memory pools need the host backend"
        )


def default_pool(device: int) -> MemPool:
    _host_only("hipDeviceGetDefaultMemPool")
    with _lock:
        pool = _defaults.get(device)
        if pool is None:
            pool = _defaults[device] = MemPool._create(device, False, 0, default=True)
        return pool


def current_pool(device: int) -> MemPool:
    with _lock:
        pool = _current.get(device)
    return pool if pool is not None else default_pool(device)


def _set_current(device: int, pool: MemPool) -> None:
    if pool.imported or pool.destroyed or pool.device != device:
        raise _invalid(
            "hipDeviceSetMemPool: the pool must be a live pool created for that device "
            "(imported pools cannot allocate)"
        )
    with _lock:
        _current[device] = pool


def _destroy(pool: MemPool) -> None:
    pool.destroy()
    with _lock:  # destroying a device's current pool makes its default pool current again
        if _current.get(pool.device) is pool:
            del _current[pool.device]


def _create(props: Any) -> MemPool:
    if not isinstance(props, hipMemPoolProps):
        raise _invalid(f"hipMemPoolCreate needs a hipMemPoolProps, not {short_repr(props)}")
    if _integer(props.allocType, "hipMemPoolCreate allocType") != hipMemAllocationTypePinned:
        raise _invalid("hipMemPoolCreate: allocType must be hipMemAllocationTypePinned")
    device = _location(props.location, "hipMemPoolCreate", hipError_t.hipErrorInvalidValue)
    handles = _integer(props.handleTypes, "hipMemPoolCreate handleTypes")
    if handles & ~0x7 or handles < 0:
        raise _invalid(f"hipMemPoolCreate: unknown handleTypes {handles:#x}")
    if handles & ~int(hipMemHandleTypePosixFileDescriptor):
        raise HipError(
            hipError_t.hipErrorNotSupported,
            "hipMemPoolCreate: only hipMemHandleTypePosixFileDescriptor handles exist on Linux",
        )
    reserved = props.reserved
    if (
        props.win32SecurityAttributes not in (None, 0)
        or not isinstance(reserved, (bytes, bytearray, memoryview))
        or bytes(reserved) != bytes(56)
    ):
        raise _invalid("hipMemPoolCreate: win32SecurityAttributes and reserved must be zero")
    _host_only("hipMemPoolCreate")
    return MemPool._create(device, bool(handles), _count(props.maxSize, "hipMemPoolCreate maxSize"))


def _region(ptr: int, what: str) -> PoolRegion:
    region, _ = get_registry().find(ptr)
    if not isinstance(region, PoolRegion):
        raise _invalid(f"{what}: {ptr:#x} is not memory from a memory pool")
    if region.ptr != ptr:
        raise _invalid(f"{what}: {ptr:#x} points inside a pool allocation; pass its base")
    return region


def _free_async(ptr: int, stream: Stream) -> None:
    region = _region(ptr, "hipFreeAsync")
    pool: MemPool = region.owner
    if pool.take(region, "hipFreeAsync"):
        pool.defer()
        try:
            stream.launch_host_func(pool.release, (region,))
        except BaseException:
            pool.release(region)  # not enqueued: released now rather than never
            raise


def _set_attribute(pool: MemPool, attr: hipMemPoolAttr, value: int) -> None:
    if not 0 <= value < 1 << 64:  # HIP's values are uint64_t (the reuse switches int)
        raise _invalid(f"hipMemPoolSetAttribute: {attr.name} must be in [0, 2**64)")
    if attr == _A.hipMemPoolAttrReleaseThreshold:
        pool.release_threshold = value
    elif attr in (_A.hipMemPoolAttrReservedMemHigh, _A.hipMemPoolAttrUsedMemHigh):
        if value:
            raise _invalid(f"hipMemPoolSetAttribute: {attr.name} can only be reset to 0")
        if attr == _A.hipMemPoolAttrReservedMemHigh:
            pool.reserved_high = pool.reserved
        else:
            pool.used_high = pool.used
    elif attr in (_A.hipMemPoolAttrReservedMemCurrent, _A.hipMemPoolAttrUsedMemCurrent):
        raise _invalid(f"hipMemPoolSetAttribute: {attr.name} is read-only")
    else:
        pool.reuse[int(attr)] = int(bool(value))


def _get_attribute(pool: MemPool, attr: hipMemPoolAttr) -> int:
    pool._refresh()
    return {
        _A.hipMemPoolAttrReleaseThreshold: pool.release_threshold,
        _A.hipMemPoolAttrReservedMemCurrent: pool.reserved,
        _A.hipMemPoolAttrReservedMemHigh: pool.reserved_high,
        _A.hipMemPoolAttrUsedMemCurrent: pool.used,
        _A.hipMemPoolAttrUsedMemHigh: pool.used_high,
    }.get(attr, pool.reuse.get(int(attr), 0))


def _attr(attr: Any, what: str) -> hipMemPoolAttr:
    try:
        return hipMemPoolAttr(_integer(attr, f"{what} attr"))
    except ValueError:
        raise _invalid(f"{what}: {short_repr(attr)} is not a hipMemPoolAttr") from None


def _set_access(pool: MemPool, descs: Any, count: Any) -> None:
    items = [descs] if isinstance(descs, hipMemAccessDesc) else list(descs or ())
    n = len(items) if count is None else _count(count, "hipMemPoolSetAccess count")
    if n > _device_count():
        raise HipError(
            hipError_t.hipErrorInvalidDevice, "hipMemPoolSetAccess: count exceeds the devices"
        )
    if n > len(items):
        raise _invalid(f"hipMemPoolSetAccess: count {n} but {len(items)} descriptor(s)")
    changes: list[tuple[int, int]] = []
    for desc in items[:n]:  # all checked before any is applied (HIP's batch rule)
        if not isinstance(desc, hipMemAccessDesc):
            raise _invalid(f"hipMemPoolSetAccess needs hipMemAccessDesc, not {short_repr(desc)}")
        device = _location(desc.location, "hipMemPoolSetAccess", hipError_t.hipErrorInvalidDevice)
        try:
            flags = hipMemAccessFlags(_integer(desc.flags, "hipMemPoolSetAccess flags"))
        except ValueError:
            raise _invalid(f"hipMemPoolSetAccess: flags {short_repr(desc.flags)}") from None
        if device == pool.device and flags != hipMemAccessFlagsProtReadWrite:
            raise HipError(
                hipError_t.hipErrorInvalidDevice
                if flags == hipMemAccessFlagsProtNone
                else hipError_t.hipErrorNotSupported,
                "hipMemPoolSetAccess: the pool's own device always has read-write access",
            )
        changes.append((device, int(flags)))
    for device, value in changes:
        if device != pool.device:
            pool.access[device] = value


def _get_access(pool: MemPool, location: Any) -> hipMemAccessFlags:
    device = _location(location, "hipMemPoolGetAccess", hipError_t.hipErrorInvalidValue)
    if device == pool.device:
        return hipMemAccessFlagsProtReadWrite
    return hipMemAccessFlags(pool.access.get(device, 0))


def _handle_type(handle_type: Any, flags: Any, what: str) -> None:
    if _integer(handle_type, f"{what} handleType") != hipMemHandleTypePosixFileDescriptor:
        raise _invalid(f"{what}: the handle type must be hipMemHandleTypePosixFileDescriptor")
    if _integer(flags, f"{what} flags") != 0:
        raise _invalid(f"{what}: flags must be 0")


def _export_data(data: Any) -> bytes:
    if isinstance(data, hipMemPoolPtrExportData):
        return bytes(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _invalid(
            f"hipMemPoolImportPointer needs hipMemPoolPtrExportData, not {short_repr(data)}"
        )
    return bytes(hipMemPoolPtrExportData(data))


# -- the hip* calls: validate, then one call -----------------------------------------------


def hipMemPoolCreate(props: hipMemPoolProps) -> MemPool:
    """A new pool on ``props.location.id``.  ``handleTypes``: ``hipMemHandleTypeNone`` (local)
    or ``hipMemHandleTypePosixFileDescriptor`` (shareable).  ``hipErrorInvalidValue`` for an
    allocType other than Pinned, a location that is not an existing device, non-zero reserved
    fields; ``hipErrorNotSupported`` for Win32 handle types; ``hipErrorOutOfMemory`` if even the
    pool's table cannot be had."""
    return _create(props)


def hipMemPoolDestroy(pool: MemPool) -> None:
    """Destroy ``pool``: at once if nothing is live, else when its last allocation or import
    is freed (HIP's rule).  ``hipErrorInvalidValue`` for a default pool or a second destroy."""
    _destroy(_pool(pool, "hipMemPoolDestroy"))


def hipDeviceGetDefaultMemPool(device: int) -> MemPool:
    """The default pool of ``device`` (local, created on first use, never destroyed).
    ``hipErrorInvalidDevice`` for a device that does not exist."""
    return default_pool(_device(device, "hipDeviceGetDefaultMemPool"))


def hipDeviceGetMemPool(device: int) -> MemPool:
    """The pool ``hipMallocAsync`` uses on ``device`` (the default one unless set)."""
    return current_pool(_device(device, "hipDeviceGetMemPool"))


def hipDeviceSetMemPool(device: int, pool: MemPool) -> None:
    """Make ``pool`` the one ``hipMallocAsync`` uses on ``device``.  ``hipErrorInvalidValue``
    for an imported or destroyed pool, or one of another device."""
    _set_current(_device(device, "hipDeviceSetMemPool"), _pool(pool, "hipDeviceSetMemPool"))


def hipMallocAsync(size: int, stream: Stream | None = None) -> int:
    """``size`` bytes from the current pool of ``stream``'s device (the current device for
    the null stream), in ``stream``'s order (usable at once here).  0 bytes gives 0.
    ``hipErrorOutOfMemory`` when the pool or the memory is exhausted;
    ``hipErrorInvalidHandle`` for a destroyed stream."""
    size = _count(size, "hipMallocAsync size")
    s = _stream(stream)  # the allocation is usable at once, a valid order for any stream
    # CUDA/HIP: "from the memory pool associated with the stream's device"; the null stream's
    # device is the current one.
    device = get_registry().device if s.is_null else s.device
    return current_pool(device).allocate(size) if size else 0


def hipMallocFromPoolAsync(size: int, pool: MemPool, stream: Stream | None = None) -> int:
    """``size`` bytes from ``pool``, in ``stream``'s order (usable at once here).  0 bytes
    gives 0.  ``hipErrorOutOfMemory`` past the pool's ``maxSize`` or the memory;
    ``hipErrorInvalidValue`` for an imported or destroyed pool."""
    size, pool = _count(size, "hipMallocFromPoolAsync size"), _pool(pool, "hipMallocFromPoolAsync")
    _stream(stream)  # checked only, as in hipMallocAsync
    return pool.allocate(size) if size else 0


def hipFreeAsync(ptr: int, stream: Stream | None = None) -> None:
    """Free pool memory (an allocation, or in an importer an imported pointer) when
    ``stream`` reaches this call; the pointer is unusable from now on.  ``hipFreeAsync(0)``
    does nothing.  ``hipErrorInvalidValue`` for memory not from a pool, an interior pointer
    or a second free; ``hipErrorInvalidHandle`` for a destroyed stream."""
    ptr, s = _pointer(ptr, "hipFreeAsync"), _stream(stream)
    if ptr:
        _free_async(ptr, s)


def hipMemPoolTrimTo(pool: MemPool, minBytesToKeep: int) -> None:
    """Give unused memory of ``pool`` back to the system, keeping at least
    ``minBytesToKeep`` bytes reserved (live allocations are never released)."""
    _pool(pool, "hipMemPoolTrimTo").trim(_count(minBytesToKeep, "hipMemPoolTrimTo size"))


def hipMemPoolSetAttribute(pool: MemPool, attr: int, value: int) -> None:
    """Set ``attr`` of ``pool``: the release threshold (reserved bytes the pool keeps, live
    ones included), the reuse switches, or reset a high-water mark to 0.
    ``hipErrorInvalidValue`` for an unknown or read-only attribute or a bad value."""
    _set_attribute(
        _pool(pool, "hipMemPoolSetAttribute"),
        _attr(attr, "hipMemPoolSetAttribute"),
        _integer(value, "hipMemPoolSetAttribute value"),
    )


def hipMemPoolGetAttribute(pool: MemPool, attr: int) -> int:
    """The value of ``attr`` of ``pool`` (bytes for the memory attributes, 0/1 for the reuse
    switches).  ``hipErrorInvalidValue`` for an unknown attribute."""
    return _get_attribute(
        _pool(pool, "hipMemPoolGetAttribute"), _attr(attr, "hipMemPoolGetAttribute")
    )


def hipMemPoolSetAccess(pool: MemPool, descs: Any, count: int | None = None) -> None:
    """Set devices' access to ``pool`` from ``hipMemAccessDesc`` (one, or a list and
    ``count``), all checked before any is applied.  ``hipErrorInvalidValue`` for a bad
    location type or flags; ``hipErrorInvalidDevice`` for a missing device, ``count`` above
    the device count, or revoking the pool's own device; ``hipErrorNotSupported`` for
    read-only access of its own device."""
    _set_access(_pool(pool, "hipMemPoolSetAccess"), descs, count)


def hipMemPoolGetAccess(pool: MemPool, location: hipMemLocation) -> hipMemAccessFlags:
    """The access ``location``'s device has to ``pool``.  ``hipErrorInvalidValue`` for a bad
    location type or a device that does not exist."""
    return _get_access(_pool(pool, "hipMemPoolGetAccess"), location)


def hipMemPoolExportToShareableHandle(
    pool: MemPool, handleType: int = hipMemHandleTypePosixFileDescriptor, flags: int = 0
) -> int:
    """A new close-on-exec POSIX descriptor of ``pool`` for another process (send it with
    :func:`hipipc.transport.send_fds`); the caller closes it.  ``hipErrorInvalidValue`` for a
    handle type other than ``hipMemHandleTypePosixFileDescriptor``, flags other than 0, or a
    pool not created shareable (or imported, or destroyed)."""
    _handle_type(handleType, flags, "hipMemPoolExportToShareableHandle")
    return _pool(pool, "hipMemPoolExportToShareableHandle").shareable_fd()


def hipMemPoolImportFromShareableHandle(
    handle: int, handleType: int = hipMemHandleTypePosixFileDescriptor, flags: int = 0
) -> MemPool:
    """Import the pool behind the descriptor ``handle`` (from ``recv_fds``; still the
    caller's to close).  ``hipErrorInvalidValue`` for None, a bad handle type or flags, or a
    descriptor that is not a sealed hipipc pool; ``hipErrorOutOfMemory`` when it cannot be
    mapped."""
    if handle is None:
        raise _invalid("hipMemPoolImportFromShareableHandle: the handle is nullptr")
    fd = _count(handle, "hipMemPoolImportFromShareableHandle handle")
    if fd > 2**31 - 1:
        raise _invalid(f"hipMemPoolImportFromShareableHandle: {fd} is no descriptor")
    _handle_type(handleType, flags, "hipMemPoolImportFromShareableHandle")
    _host_only("hipMemPoolImportFromShareableHandle")
    return MemPool._import_fd(fd)


def hipMemPoolExportPointer(ptr: int) -> hipMemPoolPtrExportData:
    """The export data of a live allocation of a shareable pool (64 bytes, any channel).
    ``hipErrorInvalidValue`` for a nullptr, memory not from a pool, an interior or imported
    pointer, or a pool not created with ``hipMemHandleTypePosixFileDescriptor``."""
    ptr = _pointer(ptr, "hipMemPoolExportPointer")
    if not ptr:
        raise _invalid("hipMemPoolExportPointer: nullptr")
    region = _region(ptr, "hipMemPoolExportPointer")
    return hipMemPoolPtrExportData(region.owner.export_pointer(region))


def hipMemPoolImportPointer(pool: MemPool, exportData: Any) -> int:
    """Map the allocation ``exportData`` names from the imported ``pool``; free it with
    ``hipFree``/``hipFreeAsync`` before the exporter frees it.  Importing the same data
    again returns the same pointer (one free each).  ``hipErrorInvalidValue`` for None, data
    of another pool, a freed allocation, or altered bytes."""
    if exportData is None:
        raise _invalid("hipMemPoolImportPointer: the export data is nullptr")
    return _pool(pool, "hipMemPoolImportPointer").import_pointer(_export_data(exportData))


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _defaults.clear()  # the parent's pools are forgotten in a child (hipipc.poolcore)
    _current.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
