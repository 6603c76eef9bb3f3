"""Pinned host memory and pointer queries: ``hipHostMalloc``/``hipHostFree``,
``hipHostRegister``/``hipHostUnregister``, ``hipHostGetDevicePointer``,
``hipPointerGetAttributes``.

Python form: ``hipHostMalloc`` returns a writable ``numpy.uint8`` array (buffer protocol, so
it goes wherever a host buffer goes: ``hipMemcpy``, numpy, ctypes, ``memoryview``) instead of a
pointer; the host calls take that array, any buffer over the same memory, or its address as an
``int``.  What "pinned" means is the backend's (host backend: a page-aligned anonymous mapping,
``mlock``'ed when ``RLIMIT_MEMLOCK`` allows, see ``$HIPIPC_PIN``).  ``hipHostFree`` gives the
memory back; as with device memory, numpy views still alive keep it mapped until they go
(never a use-after-unmap crash).
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .backends import Allocation, ImportedMemory, Region
from .devtypes import (
    hipMemoryTypeDevice,
    hipMemoryTypeHost,
    hipPointerAttribute_t,
)
from .errors import HipError, hipError_t
from .hostbuf import refuse_objects
from .mapping import Mapping
from .registry import get_registry
from .runtime import _integer

__all__ = [
    "hipHostMallocDefault",
    "hipHostMallocPortable",
    "hipHostMallocMapped",
    "hipHostMallocWriteCombined",
    "hipHostMallocNumaUser",
    "hipHostMallocCoherent",
    "hipHostMallocNonCoherent",
    "hipHostRegisterDefault",
    "hipHostRegisterPortable",
    "hipHostRegisterMapped",
    "hipHostRegisterIoMemory",
    "hipHostRegisterReadOnly",
    "hipHostMalloc",
    "hipHostFree",
    "hipHostRegister",
    "hipHostUnregister",
    "hipHostGetDevicePointer",
    "hipPointerGetAttributes",
]

hipHostMallocDefault = 0x0
hipHostMallocPortable = 0x1
hipHostMallocMapped = 0x2
hipHostMallocWriteCombined = 0x4
hipHostMallocNumaUser = 0x20000000
hipHostMallocCoherent = 0x40000000
hipHostMallocNonCoherent = 0x80000000
_MALLOC_FLAGS = (
    hipHostMallocPortable
    | hipHostMallocMapped
    | hipHostMallocWriteCombined
    | hipHostMallocNumaUser
    | hipHostMallocCoherent
    | hipHostMallocNonCoherent
)

hipHostRegisterDefault = 0x0
hipHostRegisterPortable = 0x1
hipHostRegisterMapped = 0x2
hipHostRegisterIoMemory = 0x4
hipHostRegisterReadOnly = 0x8
_REGISTER_FLAGS = (
    hipHostRegisterPortable
    | hipHostRegisterMapped
    | hipHostRegisterIoMemory
    | hipHostRegisterReadOnly
)


class _ViewPins:
    """``Mapping.buffer``/``Mapping.pin``'s interface over a registered buffer: what the
    backend's ``pin`` and ``asarray`` call on a region's state."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        return self.view[offset : offset + nbytes]  # a new view: valid after unregister too

    pin = buffer  # Mapping.pin: the slice keeps the registered buffer alive as long


@dataclass(eq=False)
class _HostRange:
    base: int
    size: int
    flags: int
    device: int
    locked: bool
    keep: Any  # hipHostMalloc: its Mapping; hipHostRegister: a memoryview of the buffer
    region: Region | None = None  # its entry in the registry (device-pointer use)

    @property
    def malloced(self) -> bool:
        return isinstance(self.keep, Mapping)


class _HostTable:
    """This process's pinned and registered host ranges, by base address.  Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bases: list[int] = []
        self.ranges: dict[int, _HostRange] = {}

    def find(self, addr: int) -> _HostRange | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0:
            r = self.ranges[self.bases[i]]
            if addr < r.base + r.size:
                return r
        return None

    def overlaps(self, base: int, size: int) -> bool:
        i = bisect.bisect_left(self.bases, base + size) - 1
        return i >= 0 and self.ranges[self.bases[i]].base + self.ranges[self.bases[i]].size > base

    def add(self, r: _HostRange) -> None:
        bisect.insort(self.bases, r.base)
        self.ranges[r.base] = r

    def remove(self, r: _HostRange) -> None:
        del self.ranges[r.base]
        del self.bases[bisect.bisect_left(self.bases, r.base)]


_table = _HostTable()


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _flags(flags: Any, allowed: int, what: str) -> int:
    if (
        isinstance(flags, bool)
        or not isinstance(flags, (int, np.integer))
        or flags < 0
        or int(flags) & ~allowed
    ):
        raise _invalid(f"{what}: invalid flags {flags!r}")
    return int(flags)


def _address(obj: Any, what: str) -> int | None:
    """The address ``obj`` stands for: an int pointer, or a buffer's first byte; None for
    HIP's nullptr (None or 0)."""
    if obj is None:
        return None
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj) or None
    refuse_objects(obj, what)
    try:
        arr = np.frombuffer(obj, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise _invalid(f"{what} needs a pointer (int) or a C-contiguous buffer: {exc}") from None
    return arr.__array_interface__["data"][0] or None


def _publish_locked(r: _HostRange, state: Any) -> None:
    """Enter ``r`` in this process's table (whose lock the caller holds) and, with a
    ``state`` to pin it by, in the registry: then its device pointer (its address) works in
    ``asarray`` and the copy calls as device memory does."""
    if state is not None:
        # No handle: the range cannot be exported, freed with hipFree or closed.
        region = Region(r.base, r.size, r.device, None, state)  # type: ignore[arg-type]
        get_registry().add_host_range(region)  # first: it may refuse an overlap
        r.region = region
    _table.add(r)


def _unpublish(r: _HostRange) -> None:
    if r.region is not None:
        get_registry().remove_host_range(r.region)


def hipHostMalloc(nbytes: int, flags: int = hipHostMallocDefault) -> NDArray[np.uint8] | None:
    """``nbytes`` of pinned host memory as a writable ``numpy.uint8`` array (None for 0
    bytes, HIP's nullptr).

    ``flags``: ``hipHostMallocDefault`` or an OR of ``hipHostMallocPortable``, ``Mapped``,
    ``WriteCombined``, ``NumaUser``, ``Coherent``, ``NonCoherent`` (not both of the last
    two); anything else is ``hipErrorInvalidValue``, as in HIP.  The memory is always
    mapped and portable on the host backend.  ``hipErrorOutOfMemory`` if it cannot be had.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
        raise _invalid(f"hipHostMalloc size must be an int >= 0, not {nbytes!r}")
    flags = _flags(flags, _MALLOC_FLAGS, "hipHostMalloc")
    if flags & hipHostMallocCoherent and flags & hipHostMallocNonCoherent:
        raise _invalid(
            "hipHostMalloc: hipHostMallocCoherent and hipHostMallocNonCoherent exclude each other"
        )
    if nbytes == 0:
        return None
    reg = get_registry()
    mapping, locked = reg.backend.host_alloc(int(nbytes), flags)
    try:
        # ignore: a ctypes array has the buffer protocol; numpy's stubs for Python < 3.12
        # list only some buffer types.
        array: NDArray[np.uint8] = np.frombuffer(  # type: ignore[call-overload]
            mapping.buffer(0, int(nbytes)), dtype=np.uint8
        )
        r = _HostRange(mapping.addr, int(nbytes), flags, reg.device, locked, mapping)
        with _table.lock:
            _publish_locked(r, mapping)
    except BaseException:
        mapping.release()
        raise
    return array


def hipHostFree(ptr: Any) -> None:
    """Free memory from ``hipHostMalloc`` (the array, a buffer starting at it, or its address).

    ``hipHostFree(None)``/``(0)`` does nothing.  Raises ``hipErrorInvalidValue`` for anything
    else: an interior or unknown address, registered memory, device memory.
    """
    addr = _address(ptr, "hipHostFree")
    if addr is None:
        return
    with _table.lock:
        r = _table.ranges.get(addr)
        if r is None or not r.malloced:
            raise _invalid(
                f"hipHostFree: {addr:#x} is not memory hipHostMalloc returned "
                "(freed already, interior, registered or device memory?)"
            )
        _table.remove(r)
        if r.locked:
            # Unpinned now, as in HIP, not when the last view goes: a view still alive
            # keeps the pages mapped, but must not keep them counted against
            # RLIMIT_MEMLOCK (later hipHostMalloc calls would fail under HIPIPC_PIN=require).
            get_registry().backend.host_unlock(r.base, r.size)
    _unpublish(r)
    r.keep.release()  # unmapped once the last numpy view is gone


def hipHostRegister(buf: Any, nbytes: int, flags: int = hipHostRegisterDefault) -> None:
    """Pin the first ``nbytes`` of an existing host buffer (numpy array, bytearray, ...).

    No alignment is needed (as in CUDA >= 4.0 and HIP); the pages holding the range are
    locked as ``hipHostMalloc`` memory is.  The buffer is kept referenced until
    ``hipHostUnregister``.  Raises ``hipErrorInvalidValue`` for a nullptr, an int address
    (hipipc cannot know what lies there: pass the buffer), ``nbytes`` 0 or beyond the buffer,
    a read-only buffer without ``hipHostRegisterReadOnly``, or other flags;
    ``hipErrorHostMemoryAlreadyRegistered`` if any of the range is registered or came from
    ``hipHostMalloc``.
    """
    flags = _flags(flags, _REGISTER_FLAGS, "hipHostRegister")
    if buf is None or isinstance(buf, (int, np.integer)):
        raise _invalid(
            "hipHostRegister needs the buffer itself (a nullptr or int address cannot be checked)"
        )
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
        raise _invalid(f"hipHostRegister size must be an int > 0, not {nbytes!r}")
    refuse_objects(buf, "hipHostRegister buffer")  # copies to its device pointer: raw bytes
    try:
        view = memoryview(buf).cast("B")
    except (TypeError, ValueError) as exc:
        raise _invalid(f"hipHostRegister needs a C-contiguous buffer: {exc}") from None
    if view.nbytes < nbytes:
        raise _invalid(f"hipHostRegister: the buffer holds {view.nbytes} bytes, {nbytes} requested")
    if view.readonly and not flags & hipHostRegisterReadOnly:
        raise _invalid(
            "hipHostRegister: the buffer is read-only (pass "
            "hipHostRegisterReadOnly to register it anyway)"
        )
    base = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    reg = get_registry()
    with _table.lock:
        if _table.overlaps(base, int(nbytes)):
            raise HipError(
                hipError_t.hipErrorHostMemoryAlreadyRegistered,
                f"[{base:#x}, +{nbytes}) overlaps registered or pinned memory",
            )
        if reg.overlaps(base, int(nbytes)):
            # HIP: memory the runtime knows already (hipMalloc, an import) cannot be
            # registered; here its entry would also be shadowed by the registration's.
            raise HipError(
                hipError_t.hipErrorHostMemoryAlreadyRegistered,
                f"[{base:#x}, +{nbytes}) is device memory (hipMalloc or an "
                "import): it needs no registration",
            )
        locked = reg.backend.host_lock(base, int(nbytes))
        r = _HostRange(base, int(nbytes), flags, reg.device, locked, view)
        try:
            # A read-only buffer gets no device pointer: a copy to it would write into it.
            _publish_locked(r, None if view.readonly else _ViewPins(view))
        except BaseException:
            if locked:
                reg.backend.host_unlock(base, int(nbytes))
            raise


def hipHostUnregister(ptr: Any) -> None:
    """Unpin memory ``hipHostRegister`` pinned (the buffer or its address).

    Raises ``hipErrorHostMemoryNotRegistered`` for an address that is not the start of a
    registered range (``hipHostMalloc`` memory included) and ``hipErrorInvalidValue`` for
    a nullptr.
    """
    addr = _address(ptr, "hipHostUnregister")
    if addr is None:
        raise _invalid("hipHostUnregister: nullptr")
    with _table.lock:
        r = _table.ranges.get(addr)
        if r is None or r.malloced:
            raise HipError(
                hipError_t.hipErrorHostMemoryNotRegistered,
                f"{addr:#x} is not the start of memory hipHostRegister pinned",
            )
        _table.remove(r)
        if r.locked:
            get_registry().backend.host_unlock(r.base, r.size)
    _unpublish(r)
    r.keep.release()


def hipHostGetDevicePointer(ptr: Any, flags: int = 0) -> int:
    """The device address of pinned or registered host memory (interior addresses allowed).

    With unified addressing (every host-backend device) it is the host address itself, and
    it works as a device pointer: in ``asarray``, ``hipMemcpy``'s ``int`` side, a host-function
    kernel (not for ``hipHostRegisterReadOnly`` memory).  Raises ``hipErrorInvalidValue`` for
    ``flags`` other than 0 or memory that is neither pinned nor registered.
    """
    if _integer(flags, "hipHostGetDevicePointer flags") != 0:
        raise _invalid(f"hipHostGetDevicePointer flags must be 0, got {flags!r}")
    addr = _address(ptr, "hipHostGetDevicePointer")
    with _table.lock:
        r = _table.find(addr) if addr is not None else None
    if r is None:
        raise _invalid(
            f"hipHostGetDevicePointer: {addr or 0:#x} is neither hipHostMalloc "
            "nor hipHostRegister memory"
        )
    assert addr is not None  # r was found at it
    return addr


def hipPointerGetAttributes(ptr: Any) -> hipPointerAttribute_t:
    """What ``ptr`` points into (interior pointers allowed).

    * ``hipMalloc`` memory and imports (``hipIpcOpenMemHandle``): ``hipMemoryTypeDevice``,
      the allocation's device, ``devicePointer = ptr``, ``hostPointer = 0`` (as HIP);
    * ``hipHostMalloc`` / ``hipHostRegister`` memory: ``hipMemoryTypeHost``, the device
      current when it was pinned, both pointers ``ptr``, ``allocationFlags`` its flags.

    ``ptr`` may be an int or a buffer.  Raises ``hipErrorInvalidValue`` for a nullptr and for
    memory HIP does not know (freed, closed, never allocated, a plain numpy array), as HIP
    does; CUDA instead answers ``cudaMemoryTypeUnregistered`` there.
    """
    addr = _address(ptr, "hipPointerGetAttributes")
    if addr is None:
        raise _invalid("hipPointerGetAttributes: nullptr")
    with _table.lock:
        r = _table.find(addr)
    if r is not None:
        return hipPointerAttribute_t(
            hipMemoryTypeHost, r.device, addr, addr, 0, r.flags, r.base, r.size
        )
    try:
        region, _ = get_registry().find(addr)
        pool_memory = getattr(region, "is_device_memory", False)  # hipipc.poolcore
        if not isinstance(region, (Allocation, ImportedMemory)) and not pool_memory:
            raise HipError(hipError_t.hipErrorInvalidValue, "a host range just removed")
    except HipError:
        raise _invalid(
            f"hipPointerGetAttributes: {addr:#x} is not memory this process "
            "allocated, imported, pinned or registered (freed or closed "
            "already?)"
        ) from None
    return hipPointerAttribute_t(
        hipMemoryTypeDevice, region.device, addr, 0, 0, 0, region.ptr, region.size
    )


def _after_fork_in_child() -> None:
    global _table
    _table = _HostTable()  # a forked child starts a fresh runtime (see hipipc.registry)


os.register_at_fork(after_in_child=_after_fork_in_child)
