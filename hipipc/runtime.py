"""The hip* function table.

The rule, once: HIP's names are kept; results are returned instead of written through
out-parameters; failures raise :class:`~hipipc.errors.HipError` (its ``.code`` is the
``hipError_t`` HIP would have returned) instead of being returned.  The exceptions are
``hipEventQuery`` and ``hipStreamQuery``, which return ``hipSuccess`` or ``hipErrorNotReady``.

Each function validates its arguments, then makes one call into the per-process registry or
the backend.  A device pointer is an ``int`` (interior pointers allowed, bounds checked); a
host buffer is any object with the buffer protocol (numpy array, bytearray, memoryview, bytes
for sources).
"""

from __future__ import annotations

import enum
import operator
from typing import Any

import numpy as np

from .errors import HipError, hipError_t
from .handle import IpcMemHandle
from .registry import get_registry

__all__ = [
    "hipMemcpyKind",
    "hipMemcpyHostToHost",
    "hipMemcpyHostToDevice",
    "hipMemcpyDeviceToHost",
    "hipMemcpyDeviceToDevice",
    "hipMemcpyDefault",
    "hipIpcMemLazyEnablePeerAccess",
    "hipGetDeviceCount",
    "hipSetDevice",
    "hipGetDevice",
    "hipDeviceSynchronize",
    "hipMalloc",
    "hipFree",
    "hipMemset",
    "hipMemGetAddressRange",
    "hipMemcpy",
    "hipIpcGetMemHandle",
    "hipIpcOpenMemHandle",
    "hipIpcCloseMemHandle",
    "asarray",
]


class hipMemcpyKind(enum.IntEnum):
    """Direction of a copy, with HIP's values."""

    hipMemcpyHostToHost = 0
    hipMemcpyHostToDevice = 1
    hipMemcpyDeviceToHost = 2
    hipMemcpyDeviceToDevice = 3
    hipMemcpyDefault = 4


hipMemcpyHostToHost = hipMemcpyKind.hipMemcpyHostToHost
hipMemcpyHostToDevice = hipMemcpyKind.hipMemcpyHostToDevice
hipMemcpyDeviceToHost = hipMemcpyKind.hipMemcpyDeviceToHost
hipMemcpyDeviceToDevice = hipMemcpyKind.hipMemcpyDeviceToDevice
hipMemcpyDefault = hipMemcpyKind.hipMemcpyDefault

hipIpcMemLazyEnablePeerAccess = 1

# (destination is device, source is device) for each explicit kind.
_SIDES = {
    hipMemcpyHostToHost: (False, False),
    hipMemcpyHostToDevice: (True, False),
    hipMemcpyDeviceToHost: (False, True),
    hipMemcpyDeviceToDevice: (True, True),
}
_KIND_OF_SIDES = {sides: kind for kind, sides in _SIDES.items()}


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _count(value: Any, what: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise _invalid(f"{what} must be an integer, not {type(value).__name__}") from None
    if n < 0:
        raise _invalid(f"{what} must not be negative ({n})")
    return n


def _is_pointer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _host_address(buf: Any, nbytes: int, writable: bool, what: str) -> tuple[int, Any]:
    """Address of a host buffer with at least ``nbytes``, and the object that keeps it alive."""
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise _invalid(f"{what} must be a C-contiguous buffer (numpy array, bytearray, "
                       f"memoryview) or, for a device side, an int pointer: {exc}") from None
    if arr.size < nbytes:
        raise _invalid(f"{what} holds {arr.size} bytes, {nbytes} needed")
    if writable and not arr.flags.writeable:
        raise _invalid(f"{what} is read-only")
    return arr.__array_interface__["data"][0], arr


# -- devices ---------------------------------------------------------------------------


def hipGetDeviceCount() -> int:
    """Number of devices of the active backend (host: ``$HIPIPC_HOST_DEVICES``, default 1)."""
    return get_registry().backend.device_count()


def hipSetDevice(device: int) -> None:
    """Make ``device`` current for this thread; ``hipErrorInvalidDevice`` if out of range."""
    try:
        device = operator.index(device)
    except TypeError:
        raise HipError(hipError_t.hipErrorInvalidDevice, f"device {device!r}") from None
    get_registry().set_device(device)


def hipGetDevice() -> int:
    """This thread's current device (0 until ``hipSetDevice``)."""
    return get_registry().device


def hipDeviceSynchronize() -> None:
    """Wait for all work queued on the current device."""
    reg = get_registry()
    reg.backend.synchronize(reg.device)


# -- memory ----------------------------------------------------------------------------


def hipMalloc(nbytes: int) -> int:
    """Allocate ``nbytes`` of device memory on the current device and return its pointer.

    As in HIP, ``hipMalloc(0)`` returns 0 (the null pointer).  Raises ``hipErrorOutOfMemory``
    when the memory cannot be reserved (host backend: the tmpfs behind the store is full).
    The allocation is private until ``hipIpcGetMemHandle`` exports it.
    """
    nbytes = _count(nbytes, "hipMalloc size")
    if nbytes == 0:
        return 0
    return get_registry().allocate(nbytes)


def hipFree(ptr: int) -> None:
    """Free an allocation.  ``hipFree(0)`` does nothing.

    Revokes its export: later ``hipIpcOpenMemHandle`` calls anywhere fail with
    ``hipErrorInvalidResourceHandle``; processes that already opened it keep valid memory
    until they close it (CUDA leaves this undefined).  An interior or unknown pointer raises
    ``hipErrorInvalidValue``.
    """
    if not _is_pointer(ptr):
        raise _invalid(f"hipFree needs an int pointer, not {type(ptr).__name__}")
    if ptr == 0:
        return
    get_registry().free(int(ptr))


def hipMemset(ptr: int, value: int, nbytes: int) -> None:
    """Set ``nbytes`` bytes at ``ptr`` to ``value & 0xff`` (bounds checked)."""
    nbytes = _count(nbytes, "hipMemset size")
    if not _is_pointer(ptr):
        raise _invalid(f"hipMemset needs an int pointer, not {type(ptr).__name__}")
    try:
        value = operator.index(value) & 0xFF
    except TypeError:
        raise _invalid(f"hipMemset value must be an integer, not {type(value).__name__}"
                       ) from None
    reg = get_registry()
    if nbytes:
        reg.check_range(int(ptr), nbytes)
        reg.backend.memset(int(ptr), value, nbytes)


def hipMemGetAddressRange(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation or import holding ``ptr``; interior pointers allowed."""
    if not _is_pointer(ptr):
        raise _invalid(f"hipMemGetAddressRange needs an int pointer, not {type(ptr).__name__}")
    region, _ = get_registry().find(int(ptr))
    return region.ptr, region.size


def _copy_side(obj: Any, is_device: bool, nbytes: int, writable: bool, what: str
               ) -> tuple[int, Any]:
    if is_device:
        if not _is_pointer(obj):
            raise _invalid(f"{what} must be a device pointer (int) for this copy kind, "
                           f"not {type(obj).__name__}")
        get_registry().check_range(int(obj), nbytes)
        return int(obj), None
    if _is_pointer(obj):
        raise _invalid(f"{what} is an int but this copy kind says it is host memory; "
                       "pass a buffer or use hipMemcpyDefault")
    return _host_address(obj, nbytes, writable, what)


def hipMemcpy(dst: Any, src: Any, nbytes: int, kind: int = hipMemcpyDefault) -> None:
    """Copy ``nbytes`` from ``src`` to ``dst``.

    A device side is an ``int`` pointer from this process's ``hipMalloc`` or
    ``hipIpcOpenMemHandle`` (interior pointers allowed; the range must stay inside the
    allocation); a host side is a buffer.  With ``hipMemcpyDefault`` each side's type decides.
    Raises ``hipErrorInvalidMemcpyDirection`` for an unknown ``kind`` and
    ``hipErrorInvalidValue`` for sides that do not match it or ranges out of bounds.
    """
    nbytes = _count(nbytes, "hipMemcpy size")
    try:
        kind = hipMemcpyKind(kind)
    except ValueError:
        raise HipError(hipError_t.hipErrorInvalidMemcpyDirection,
                       f"hipMemcpy kind {kind!r} is not a hipMemcpyKind") from None
    if kind == hipMemcpyDefault:
        dst_dev, src_dev = _is_pointer(dst), _is_pointer(src)
        kind = _KIND_OF_SIDES[dst_dev, src_dev]
    else:
        dst_dev, src_dev = _SIDES[kind]
    dst_addr, _keep_dst = _copy_side(dst, dst_dev, nbytes, True, "hipMemcpy destination")
    src_addr, _keep_src = _copy_side(src, src_dev, nbytes, False, "hipMemcpy source")
    if nbytes:
        get_registry().backend.memcpy(dst_addr, src_addr, nbytes, kind)


def asarray(ptr: int, shape: int | tuple[int, ...], dtype: Any = np.uint8) -> Any:
    """A zero-copy array of ``shape``/``dtype`` over device memory at ``ptr``.

    Host backend: a ``numpy.ndarray`` that keeps the mapping alive, even after ``hipFree`` or
    ``hipIpcCloseMemHandle`` (the memory is unmapped when the last view goes).  The range must
    lie inside one allocation, else ``hipErrorInvalidValue``.
    """
    if not _is_pointer(ptr):
        raise _invalid(f"asarray needs an int pointer, not {type(ptr).__name__}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    except TypeError as exc:
        raise _invalid(f"asarray: {exc}") from None
    if any(int(n) < 0 for n in shape):
        raise _invalid(f"asarray: negative dimension in {shape}")
    reg = get_registry()
    region, offset = reg.check_range(int(ptr), nbytes)
    return reg.backend.asarray(region, offset, shape, dt)


# -- IPC memory ------------------------------------------------------------------------


def hipIpcGetMemHandle(ptr: int, *, share: str | None = None) -> IpcMemHandle:
    """Export the allocation holding ``ptr`` and return its 64-byte handle.

    CUDA's rule: an interior pointer gives its allocation's handle (the offset is not encoded;
    use ``hipMemGetAddressRange``); exporting twice gives the same bytes.  ``share``
    (``user``/``group``/``all``, default ``$HIPIPC_SHARE`` or ``user``) decides which other uids
    may open it, on the first export.  Raises ``hipErrorInvalidValue`` for a pointer that is
    not this process's own allocation.
    """
    if not _is_pointer(ptr) or ptr == 0:
        raise _invalid(f"hipIpcGetMemHandle needs a device pointer, not {ptr!r}")
    return get_registry().export(int(ptr), share)


def hipIpcOpenMemHandle(handle: IpcMemHandle | bytes | bytearray | memoryview,
                        flags: int = hipIpcMemLazyEnablePeerAccess) -> int:
    """Open memory another process exported; returns the base pointer.

    ``handle`` is an :class:`IpcMemHandle` or its 64 raw bytes.  Opening the same handle again
    in one process returns the same pointer and needs one more close.  Raises
    ``hipErrorInvalidValue`` for malformed bytes or ``flags`` other than
    ``hipIpcMemLazyEnablePeerAccess``; ``hipErrorInvalidContext`` in the exporting process;
    ``hipErrorInvalidResourceHandle`` when the handle names nothing this user may open (freed,
    exporter gone, another user's unshared memory, or a handle altered in transit).
    """
    if flags != hipIpcMemLazyEnablePeerAccess:
        raise _invalid(f"hipIpcOpenMemHandle flags must be hipIpcMemLazyEnablePeerAccess "
                       f"({hipIpcMemLazyEnablePeerAccess}), got {flags!r}")
    return get_registry().open(IpcMemHandle.coerce(handle))


def hipIpcCloseMemHandle(ptr: int) -> None:
    """Close one open of an imported pointer; the memory is unmapped with the last close.

    Raises ``hipErrorInvalidValue`` (as HIP does) for a pointer that was not returned by
    ``hipIpcOpenMemHandle`` or is already fully closed.
    """
    if not _is_pointer(ptr):
        raise _invalid(f"hipIpcCloseMemHandle needs an int pointer, not {type(ptr).__name__}")
    get_registry().close(int(ptr))
