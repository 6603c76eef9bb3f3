"""The hip* function table.

The rule, once: HIP's names are kept; results are returned instead of written through
out-parameters; failures raise :class:`~hipipc.errors.HipError` (its ``.code`` is the
``hipError_t`` HIP would have returned) instead of being returned.  The exceptions are
``hipEventQuery`` and ``hipStreamQuery``, which return ``hipSuccess`` or ``hipErrorNotReady``.

Each function validates its arguments, then makes one call into the per-process registry, the
backend, or the stream or event object the backend made.  ``stream=None`` (or ``0``) is the
null stream: CUDA's legacy default stream, asynchronous to the host (see
:mod:`hipipc.streams`); ``hipMemcpy`` and ``hipMemset`` are the synchronous calls.  Every
integer argument (sizes, values, devices, flags, kinds, pointers) takes any integer type
(``operator.index``: numpy integers too) and refuses ``bool``.  The waiting calls
(``hipStreamSynchronize``, ``hipEventSynchronize``, ``hipDeviceSynchronize``) take an optional
keyword ``timeout`` in seconds, an extension: ``hipErrorNotReady`` when it passes.

A device pointer is an ``int`` (interior pointers allowed, bounds checked); a host buffer is
any object with the buffer protocol (numpy array, bytearray, memoryview, bytes for sources).
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import registry as _registry_module
from .arrays import as_shared
from .errors import HipError, hipError_t, short_repr
from .events import Event, check_event_flags, hipEventDefault
from .handle import IpcEventHandle, IpcMemHandle
from .hostbuf import host_address
from .registry import get_registry
from .streams import Stream, destroyed_stream, hipStreamDefault, hipStreamNonBlocking
from .timeouts import check_timeout

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
    "hipMemcpyAsync",
    "hipMemsetAsync",
    "hipIpcGetMemHandle",
    "hipIpcOpenMemHandle",
    "hipIpcCloseMemHandle",
    "asarray",
    "hipStreamCreate",
    "hipStreamCreateWithFlags",
    "hipStreamDestroy",
    "hipStreamSynchronize",
    "hipStreamQuery",
    "hipStreamWaitEvent",
    "hipLaunchHostFunc",
    "hipEventCreate",
    "hipEventCreateWithFlags",
    "hipEventRecord",
    "hipEventQuery",
    "hipEventSynchronize",
    "hipEventElapsedTime",
    "hipEventDestroy",
    "hipIpcGetEventHandle",
    "hipIpcOpenEventHandle",
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


def _integer(value: Any, what: str, code: hipError_t = hipError_t.hipErrorInvalidValue) -> int:
    """``value`` as an int: any integer type (``operator.index``, so numpy integers), never a
    bool (``True`` is no size, flag or pointer); else ``HipError(code)``."""
    if type(value) is int:  # the common case, first: this runs on every open and close
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise HipError(code, f"{what} must be an integer, not {type(value).__name__}") from None


def _count(value: Any, what: str) -> int:
    n = _integer(value, what)
    if n < 0:
        raise _invalid(f"{what} must not be negative ({n})")
    return n


def _is_pointer(value: Any) -> bool:
    """True for what a device pointer may be (any integer type but bool); arrays are host
    buffers even when they hold one integer."""
    return not isinstance(value, (bool, np.ndarray)) and hasattr(type(value), "__index__")


def _pointer(value: Any, what: str) -> int:
    if type(value) is int:  # the common case, first (see _integer)
        return value
    if not _is_pointer(value):
        raise _invalid(f"{what} needs an int pointer, not {type(value).__name__}")
    return _integer(value, what)


# -- devices ---------------------------------------------------------------------------


def hipGetDeviceCount() -> int:
    """Number of devices of the active backend (host: ``$HIPIPC_HOST_DEVICES``, default 1)."""
    return get_registry().backend.device_count()


def hipSetDevice(device: int) -> None:
    """Make ``device`` current for this thread; ``hipErrorInvalidDevice`` if out of range."""
    get_registry().set_device(
        _integer(device, "hipSetDevice device", hipError_t.hipErrorInvalidDevice)
    )


def hipGetDevice() -> int:
    """This thread's current device (0 until ``hipSetDevice``)."""
    return get_registry().device


def hipDeviceSynchronize(*, timeout: float | None = None) -> None:
    """Wait for all work this process enqueued on its streams (destroyed ones included).

    Raises ``hipErrorLaunchFailure`` (original exception chained) for a failure in that work
    not yet reported by a ``hipStreamSynchronize``, and ``hipErrorNotReady`` after
    ``timeout`` seconds.
    """
    get_registry().synchronize(_timeout(timeout))


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
    ``hipErrorInvalidHandle``; processes that already opened it keep valid memory until they
    close it (CUDA leaves this undefined).  An interior, unknown or imported pointer raises
    ``hipErrorInvalidValue`` (an import is closed with ``hipIpcCloseMemHandle``).
    """
    ptr = _pointer(ptr, "hipFree")
    if ptr == 0:
        return
    get_registry().free(ptr)


def _memset_args(ptr: Any, value: Any, nbytes: Any, what: str) -> tuple[int, int, int]:
    nbytes = _count(nbytes, f"{what} size")
    ptr = _pointer(ptr, what)
    return ptr, _integer(value, f"{what} value") & 0xFF, nbytes


def hipMemset(ptr: int, value: int, nbytes: int) -> None:
    """Set ``nbytes`` bytes at ``ptr`` to ``value & 0xff`` (bounds checked); synchronous and
    ordered like ``hipMemcpy``."""
    ptr, value, nbytes = _memset_args(ptr, value, nbytes, "hipMemset")
    if nbytes:
        # Pinned as on the async path: a hipFree/close racing in another thread either comes
        # first (hipErrorInvalidValue here) or waits for the pin (the old pages are written).
        reg = get_registry()
        region, offset = reg.check_range(ptr, nbytes)
        pin = reg.backend.pin(region, offset, nbytes)
        _null_sync().memset(ptr, value, nbytes, (pin,))


def hipMemsetAsync(ptr: int, value: int, nbytes: int, stream: Stream | None = None) -> None:
    """``hipMemset`` enqueued on ``stream`` (bounds checked now, run in stream order).

    The memory stays mapped until the operation has run, even if it is freed meanwhile.
    """
    ptr, value, nbytes = _memset_args(ptr, value, nbytes, "hipMemsetAsync")
    s = _stream(stream)
    if nbytes:
        reg = get_registry()
        region, offset = reg.check_range(ptr, nbytes)
        s.memset(ptr, value, nbytes, (reg.backend.pin(region, offset, nbytes),))


def hipMemGetAddressRange(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation or import holding ``ptr``; interior pointers allowed.

    Raises ``hipErrorNotFound`` (HIP's code) for a pointer no allocation or import holds.
    """
    ptr = _pointer(ptr, "hipMemGetAddressRange")
    try:
        region, _ = get_registry().find(ptr)
    except HipError as exc:
        raise HipError(hipError_t.hipErrorNotFound, exc.detail) from None
    return region.ptr, region.size


def _copy_side(
    obj: Any, is_device: bool, nbytes: int, writable: bool, what: str, pin: bool
) -> tuple[int, Any]:
    """The address of one side of a copy and what keeps it valid (a pin only if ``pin``)."""
    if is_device:
        if not _is_pointer(obj):
            raise _invalid(
                f"{what} must be a device pointer (int) for this copy kind, "
                f"not {type(obj).__name__}"
            )
        ptr = _integer(obj, what)
        reg = get_registry()
        region, offset = reg.check_range(ptr, nbytes)
        return ptr, reg.backend.pin(region, offset, nbytes) if pin and nbytes else None
    if _is_pointer(obj):
        raise _invalid(
            f"{what} is an int but this copy kind says it is host memory; "
            "pass a buffer or use hipMemcpyDefault"
        )
    return host_address(obj, nbytes, writable, what)


def _copy_args(
    dst: Any, src: Any, nbytes: Any, kind: Any, what: str, pin: bool
) -> tuple[int, int, int, hipMemcpyKind, tuple[Any, Any]]:
    nbytes = _count(nbytes, f"{what} size")
    direction = hipError_t.hipErrorInvalidMemcpyDirection
    try:
        kind = hipMemcpyKind(_integer(kind, f"{what} kind", direction))
    except ValueError:
        raise HipError(
            direction, f"{what} kind {short_repr(kind)} is not a hipMemcpyKind"
        ) from None
    if kind == hipMemcpyDefault:
        dst_dev, src_dev = _is_pointer(dst), _is_pointer(src)
        kind = _KIND_OF_SIDES[dst_dev, src_dev]
    else:
        dst_dev, src_dev = _SIDES[kind]
    dst_addr, keep_dst = _copy_side(dst, dst_dev, nbytes, True, f"{what} destination", pin)
    src_addr, keep_src = _copy_side(src, src_dev, nbytes, False, f"{what} source", pin)
    return dst_addr, src_addr, nbytes, kind, (keep_dst, keep_src)


def hipMemcpy(dst: Any, src: Any, nbytes: int, kind: int = hipMemcpyDefault) -> None:
    """Copy ``nbytes`` from ``src`` to ``dst``, synchronously: as ``cudaMemcpy`` on CUDA's
    legacy default stream, it first waits for the null stream's work (which waits for the
    work enqueued before it on blocking streams), and the copy is done when it returns.

    A device side is an ``int`` pointer from this process's ``hipMalloc`` or
    ``hipIpcOpenMemHandle`` (interior pointers allowed; the range must stay inside the
    allocation); a host side is a buffer.  With ``hipMemcpyDefault`` each side's type decides.
    Raises ``hipErrorInvalidMemcpyDirection`` for an unknown ``kind`` and
    ``hipErrorInvalidValue`` for sides that do not match it or ranges out of bounds.
    """
    # Pinned as on the async path, so that a hipFree/close racing in another thread cannot
    # unmap (or remap) the memory under the copy.
    dst_addr, src_addr, nbytes, kind, keep = _copy_args(
        dst, src, nbytes, kind, "hipMemcpy", pin=True
    )
    if nbytes:
        _null_sync().memcpy(dst_addr, src_addr, nbytes, kind, keep)


def hipMemcpyAsync(
    dst: Any, src: Any, nbytes: int, kind: int = hipMemcpyDefault, stream: Stream | None = None
) -> None:
    """``hipMemcpy`` enqueued on ``stream``: checked now (same rules and errors), run in order.

    Both sides stay valid until the copy has run: host buffers are referenced and device
    memory stays mapped even if it is freed or closed meanwhile.  As in CUDA, the host buffer
    must not be changed or read until the stream reaches the copy.
    """
    dst_addr, src_addr, nbytes, kind, keep = _copy_args(
        dst, src, nbytes, kind, "hipMemcpyAsync", pin=True
    )
    s = _stream(stream)
    if nbytes:
        s.memcpy(dst_addr, src_addr, nbytes, kind, keep)


_MAX_DIM = int(np.iinfo(np.intp).max)
# The dtypes of numpy's and Python's number types, made at import: a process's first
# np.dtype(np.uint8) costs ~10 us.
_COMMON_DTYPES: dict[Any, np.dtype[Any]] = {
    t: np.dtype(t)
    for t in (
        *(np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64),
        *(np.float16, np.float32, np.float64, np.complex64, np.complex128, np.bool_),
        *(int, float, complex, bool),
    )
}


def asarray(ptr: int, shape: int | tuple[int, ...], dtype: DTypeLike = np.uint8) -> NDArray[Any]:
    """A zero-copy array of ``shape``/``dtype`` over device memory at ``ptr``.

    Host backend: a ``numpy.ndarray`` (:class:`hipipc.arrays.SharedArray`: it and its views
    pickle as shared memory) that keeps the mapping alive, even after ``hipFree`` or
    ``hipIpcCloseMemHandle`` (the memory is unmapped when the last view goes).  The range must
    lie inside one allocation, else ``hipErrorInvalidValue``.
    """
    if type(ptr) is not int:  # the common cases first, here and below (issue 15's cold path)
        ptr = _pointer(ptr, "asarray")
    if type(shape) is int:
        dims = [shape]
    else:
        # A 0-d array iterates with a TypeError: numpy takes it as one dimension.
        one = not hasattr(shape, "__iter__") or getattr(shape, "ndim", None) == 0
        parts: Iterable[Any] = (shape,) if one else shape  # type: ignore[assignment]
        dims = [_integer(n, "asarray: each dimension of shape") for n in parts]
    dt = _COMMON_DTYPES.get(dtype) if type(dtype) is type else None
    if dt is None:
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise _invalid(f"asarray: dtype must be a numpy dtype ({exc})") from None
    for n in dims:
        if n < 0 or n > _MAX_DIM:  # numpy's limit above; a negative one is named first
            if any(m < 0 for m in dims):
                raise _invalid(f"asarray: negative dimension in {short_repr(tuple(dims))}")
            raise _invalid(f"asarray: a dimension of {short_repr(tuple(dims))} exceeds {_MAX_DIM}")
    if dt.hasobject:
        raise _invalid(f"asarray: dtype {dt} holds Python objects, which raw memory cannot")
    if not dt.itemsize or dt.subdtype is not None:
        # numpy cannot view bytes as either (a ValueError escaped here before).
        raise _invalid(
            f"asarray: dtype {dt} "
            + ("has no size" if not dt.itemsize else "is a subarray")
            + "; use a dtype with a size, and put a subarray's dimensions in the shape"
        )
    shape = tuple(dims)
    nbytes = math.prod(dims) * dt.itemsize  # Python ints: no wrap-around for huge shapes
    reg = get_registry()
    region, offset = reg.check_range(ptr, nbytes)
    # A SharedArray: it and its views pickle as shared memory (hipipc.arrays).
    return as_shared(reg.backend.asarray(region, offset, shape, dt))


# -- IPC memory ------------------------------------------------------------------------


def hipIpcGetMemHandle(ptr: int, *, share: str | None = None) -> IpcMemHandle:
    """Export the allocation holding ``ptr`` and return its 64-byte handle.

    CUDA's rule: an interior pointer gives its allocation's handle (the offset is not encoded;
    use ``hipMemGetAddressRange``); exporting twice gives the same bytes.  ``share``
    (``user``/``group``/``all``, default ``$HIPIPC_SHARE`` or ``user``) decides which other uids
    may open it, on the first export.  Raises ``hipErrorInvalidValue`` for a pointer that is
    not this process's own allocation.
    """
    if not _is_pointer(ptr) or _integer(ptr, "hipIpcGetMemHandle pointer") == 0:
        raise _invalid(f"hipIpcGetMemHandle needs a device pointer, not {short_repr(ptr)}")
    return get_registry().export(_integer(ptr, "hipIpcGetMemHandle pointer"), share)


def hipIpcOpenMemHandle(
    handle: IpcMemHandle | bytes | bytearray | memoryview,
    flags: int = hipIpcMemLazyEnablePeerAccess,
) -> int:
    """Open memory another process exported; returns the base pointer.

    ``handle`` is an :class:`IpcMemHandle` or its 64 raw bytes.  Opening the same handle again
    in one process returns the same pointer and needs one more close.  Raises
    ``hipErrorInvalidValue`` for malformed bytes or ``flags`` other than
    ``hipIpcMemLazyEnablePeerAccess``; ``hipErrorInvalidContext`` in the exporting process;
    ``hipErrorInvalidHandle`` when the handle names nothing this user may open (freed,
    exporter gone, another user's unshared memory, or a handle altered in transit).
    """
    # The common cases first, inline (open+close is benchmarked against the raw syscalls):
    # an int flag, a handle object, the registry made already.
    if (type(flags) is not int or flags != hipIpcMemLazyEnablePeerAccess) and _integer(
        flags, "hipIpcOpenMemHandle flags"
    ) != hipIpcMemLazyEnablePeerAccess:
        raise _invalid(
            f"hipIpcOpenMemHandle flags must be hipIpcMemLazyEnablePeerAccess "
            f"({hipIpcMemLazyEnablePeerAccess}), got {short_repr(flags)}"
        )
    if type(handle) is not IpcMemHandle:
        handle = IpcMemHandle(handle)
    return (_registry_module._registry or get_registry()).open(handle)


def hipIpcCloseMemHandle(ptr: int) -> None:
    """Close one open of an imported pointer; the memory is unmapped with the last close.

    Raises ``hipErrorInvalidValue`` (as HIP does) for a pointer that was not returned by
    ``hipIpcOpenMemHandle`` or is already fully closed.
    """
    if type(ptr) is not int:  # the common case, inline (see hipIpcOpenMemHandle)
        ptr = _pointer(ptr, "hipIpcCloseMemHandle")
    (_registry_module._registry or get_registry()).close(ptr)


# -- streams ---------------------------------------------------------------------------


def _timeout(timeout: Any) -> float | None:
    """Seconds to wait, None for no limit: the package's one rule (:mod:`hipipc.timeouts`)."""
    return check_timeout(timeout)


def _is_null(stream: Any) -> bool:
    if stream is None or (type(stream) is int and stream == 0):
        return True
    if isinstance(stream, Stream):
        return stream.is_null
    raise _invalid(
        f"expected a stream from hipStreamCreate, or None/0 for the null stream, "
        f"not {type(stream).__name__}"
    )


def _stream(stream: Any) -> Stream:
    """``stream`` itself; for None/0 this process's null stream (asynchronous: it orders its
    work after the blocking streams' itself).

    Raises ``hipErrorInvalidHandle`` for a destroyed stream.
    """
    if not _is_null(stream):
        if stream.destroyed:
            raise destroyed_stream()
        return cast(Stream, stream)  # _is_null raised for anything but a Stream
    return get_registry().backend.null_stream()


def _null_sync() -> Stream:
    """The null stream for ``hipMemcpy``/``hipMemset``: it waits for the null stream's work,
    then runs the operation in the caller before returning."""
    return get_registry().backend.null_stream().synchronous()


def hipStreamCreate() -> Stream:
    """A new blocking stream on the current device: its work runs in order, off the caller's
    thread, and null-stream operations wait for it (CUDA's legacy default stream)."""
    return get_registry().create_stream()


def hipStreamCreateWithFlags(flags: int) -> Stream:
    """A new stream; ``hipStreamNonBlocking`` makes one the null stream does not wait for.

    Raises ``hipErrorInvalidValue`` for flags other than ``hipStreamDefault`` and
    ``hipStreamNonBlocking``.
    """
    value = _integer(flags, "hipStreamCreateWithFlags flags")
    if value not in (hipStreamDefault, hipStreamNonBlocking):
        raise _invalid(
            f"stream flags must be hipStreamDefault or hipStreamNonBlocking, "
            f"got {short_repr(flags)}"
        )
    return get_registry().create_stream(blocking=value != hipStreamNonBlocking)


def hipStreamDestroy(stream: Stream) -> None:
    """Destroy ``stream``; returns at once and enqueued work still runs (CUDA's rule).

    A failure that work reports later is raised by ``hipDeviceSynchronize``.  Raises
    ``hipErrorInvalidHandle`` for the null stream or a stream destroyed already.
    """
    if _is_null(stream):
        raise HipError(
            hipError_t.hipErrorInvalidHandle,
            "hipStreamDestroy: the null stream cannot be destroyed",
        )
    if stream.destroyed:
        raise HipError(
            hipError_t.hipErrorInvalidHandle, "hipStreamDestroy: the stream was destroyed already"
        )
    stream.destroy()


def hipStreamSynchronize(stream: Stream | None, *, timeout: float | None = None) -> None:
    """Wait until all work enqueued on ``stream`` so far has run.

    Raises ``hipErrorLaunchFailure`` (the original exception chained) if some of that work
    failed since the last synchronize, ``hipErrorNotReady`` after ``timeout`` seconds, and
    ``hipErrorInvalidHandle`` for a destroyed stream.  For the null stream: its own queue and,
    through it, the work enqueued before now on blocking streams (see ``hipStreamCreate``).
    From stream work (a host function) it is refused with ``hipErrorNotSupported``.
    """
    _stream(stream).synchronize(_timeout(timeout))


def hipStreamQuery(stream: Stream | None) -> hipError_t:
    """``hipSuccess`` if all work enqueued on ``stream`` has run, else ``hipErrorNotReady``.

    For the null stream: its own queue and the work on blocking streams."""
    done = _stream(stream).query()
    return hipError_t.hipSuccess if done else hipError_t.hipErrorNotReady


_EVENT_MODE = 0o600  # event segments are never shared beyond the exporter's uid


def hipStreamWaitEvent(stream: Stream | None, event: Event, flags: int = 0) -> None:
    """Make work enqueued on ``stream`` from now on wait for ``event``'s newest record as of
    this call, which may have been made in another process (IPC events).

    The caller does not wait, also on the null stream.  A never-recorded event
    imposes no wait.  If the recording process exits before its work completes, the wait
    ends within about 0.1 s and the stream reports ``hipErrorLaunchFailure``.  ``flags`` must
    be 0 (``hipErrorInvalidValue``).
    """
    if _integer(flags, "hipStreamWaitEvent flags") != 0:
        raise _invalid(f"hipStreamWaitEvent flags must be 0, got {short_repr(flags)}")
    _stream(stream).wait_event(_event(event))


def hipLaunchHostFunc(stream: Stream | None, fn: Callable[..., Any], *args: Any) -> None:
    """Enqueue ``fn(*args)`` on ``stream``: the host backend's kernel launch.

    Returns at once, also on the null stream (where ``fn`` runs after the blocking streams'
    earlier work).  An exception ``fn`` raises is reported by the next
    ``hipStreamSynchronize`` of ``stream`` (or ``hipDeviceSynchronize``) as
    ``hipErrorLaunchFailure`` with the exception chained, once.
    """
    if not callable(fn):
        raise _invalid(f"hipLaunchHostFunc needs a callable, not {type(fn).__name__}")
    _stream(stream).launch_host_func(fn, args)


# -- events ----------------------------------------------------------------------------


def _event(event: Any) -> Event:
    if not isinstance(event, Event):
        raise _invalid(
            f"expected an event from hipEventCreate or hipIpcOpenEventHandle, not "
            f"{type(event).__name__}"
        )
    return event


def hipEventCreate() -> Event:
    """``hipEventCreateWithFlags(hipEventDefault)``: a local event with timing."""
    return get_registry().create_event(hipEventDefault)


def hipEventCreateWithFlags(flags: int) -> Event:
    """A new event on the current device.

    ``flags``: ``hipEventDefault``, ``hipEventBlockingSync``, ``hipEventDisableTiming``,
    ``hipEventInterprocess``; an interprocess event needs ``hipEventDisableTiming`` too.
    Raises ``hipErrorInvalidValue`` for other flags or ``hipEventInterprocess`` alone.
    """
    return get_registry().create_event(
        check_event_flags(_integer(flags, "hipEventCreateWithFlags flags"))
    )


def hipEventRecord(event: Event, stream: Stream | None = None) -> None:
    """Make ``event`` stand for the work enqueued on ``stream`` so far; returns at once, also
    on the null stream (the event completes when the null stream reaches the record).

    Raises ``hipErrorLaunchOutOfResources`` in the rare case that too many records of
    ``event`` are still pending (thousands; see ``hipipc.backends.eventstate``), and
    ``hipErrorInvalidHandle`` for a destroyed event or stream.
    """
    _event(event).record(_stream(stream))


def hipEventQuery(event: Event) -> hipError_t:
    """``hipSuccess`` if the newest record's work is done (or none was made), else
    ``hipErrorNotReady``.  Raises ``hipErrorLaunchFailure`` if its recorder exited first."""
    done = _event(event).query()
    return hipError_t.hipSuccess if done else hipError_t.hipErrorNotReady


def hipEventSynchronize(event: Event, *, timeout: float | None = None) -> None:
    """Block until the newest record of ``event`` as of this call is done, without spinning.

    Raises ``hipErrorLaunchFailure`` within about 0.1 s if the process that made that record
    (the exporter or any opener) exited before its work completed, and ``hipErrorNotReady``
    after ``timeout`` seconds.
    """
    _event(event).synchronize(_timeout(timeout))


def hipEventElapsedTime(start: Event, stop: Event) -> float:
    """Milliseconds between the completions of ``start`` and ``stop``.

    Raises ``hipErrorInvalidHandle`` if either was created with
    ``hipEventDisableTiming`` or never recorded, ``hipErrorNotReady`` if either is pending.
    """
    return _event(start).elapsed_ms(_event(stop))


def hipEventDestroy(event: Event) -> None:
    """Destroy ``event``; work already enqueued still completes it (CUDA's rule).

    For an exported interprocess event the handle is revoked: new ``hipIpcOpenEventHandle``
    calls fail, processes that opened it keep a working event.  Raises
    ``hipErrorInvalidHandle`` if it was destroyed already.
    """
    ev = _event(event)
    if ev.destroyed:
        raise HipError(
            hipError_t.hipErrorInvalidHandle, "hipEventDestroy: the event was destroyed already"
        )
    ev.destroy()


def hipIpcGetEventHandle(event: Event) -> IpcEventHandle:
    """Export an interprocess event and return its 64-byte handle (same bytes each time).

    Only processes of the exporter's user can open it (``HIPIPC_SHARE`` applies to memory,
    not to events: an event's shared page holds a process-shared lock that a writer could
    corrupt).  Dropping the creator's last reference to the event destroys it and revokes the
    handle, as ``hipEventDestroy`` does.  Raises ``hipErrorInvalidValue`` for a value that is
    not an event and ``hipErrorInvalidConfiguration`` (HIP's code) unless the event was
    created with ``hipEventInterprocess | hipEventDisableTiming``.
    """
    return _event(event).export(_EVENT_MODE)


def hipIpcOpenEventHandle(handle: IpcEventHandle | bytes | bytearray | memoryview) -> Event:
    """Open an interprocess event another process exported; destroy it with
    ``hipEventDestroy``.

    Raises ``hipErrorInvalidValue`` for malformed bytes, ``hipErrorInvalidContext`` in the
    creating process, and ``hipErrorInvalidHandle`` when the handle names nothing this
    user may open (destroyed, creator gone, not shared, altered in transit).
    """
    return get_registry().open_event(IpcEventHandle.coerce(handle))
