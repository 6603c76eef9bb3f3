"""Shared numpy arrays: views of device memory that pickle as shared memory, not as copies.

``hipipc.asarray(ptr, shape, dtype)`` and ``DeviceBuffer.asarray()`` return a
:class:`SharedArray` (a numpy subclass) over host-backend memory.  Every view numpy derives
from it (slices, ``x[:, 1]``, transposes, reshapes without a copy, ``.view(dtype)``) is one
too, and pickling any of them (``Queue.put``, ``Pool.map`` arguments, ``Pipe.send``) sends
the allocation's handle, a one-time ticket (the send-and-drop protocol of
:mod:`hipipc.buffer`), the byte offset of the first element from the allocation's base, the
shape, the strides and the dtype.  The receiver gets a zero-copy view of the same bytes with
the same layout: writes are seen both ways.  This is what torch does for shared tensors
(storage handle + offset + size + stride) and numba for device arrays (handle + offset).

Which arrays are shared is decided by the memory, not the type: numpy also gives the subclass
to ufunc results and copies (``x + 1``, ``x.copy()``), which live in private memory.  An
array pickles as shared only if its base chain ends in a hipipc mapping *and* its whole byte
extent lies in one allocation this process holds (allocated or opened); any other array
pickles as numpy does (a copy).  An empty array pickles as a plain empty array.  A view of
memory freed or closed since (its mapping kept alive by the view) cannot be shared any more:
pickling raises ``hipErrorInvalidValue`` instead of silently sending a copy, as it does for a
view (``as_strided(..., subok=True)``) whose elements reach outside its allocation.
"""

from __future__ import annotations

from typing import Any, SupportsIndex, cast

import numpy as np
from numpy.typing import NDArray

from .errors import HipError, hipError_t
from .handle import IpcMemHandle
from .registry import Registry, get_registry

__all__ = ["SharedArray", "is_shared"]


class SharedArray(np.ndarray):
    """A numpy array over hipipc memory that pickles as shared memory (module docstring)."""

    def __reduce__(self) -> str | tuple[Any, ...]:
        spec = _shared_spec(self)
        if spec is None:
            return self.view(np.ndarray).__reduce__()
        return (_rebuild_array, spec)

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # ndarray's own __reduce_ex__ (protocol 5 buffers) would bypass __reduce__.
        spec = _shared_spec(self)
        if spec is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        return (_rebuild_array, spec)


def as_shared(arr: NDArray[Any]) -> NDArray[Any]:
    """``arr`` as a :class:`SharedArray` if it is a plain numpy array (CuPy arrays pass)."""
    return arr.view(SharedArray) if type(arr) is np.ndarray else arr


def _pin_of(arr: np.ndarray) -> Any:
    """The object at the end of ``arr``'s base chain if it is a hipipc mapping pin."""
    obj: Any = arr
    for _ in range(1000):  # numpy collapses chains; bounded anyway
        if not isinstance(obj, np.ndarray):
            # as_strided (and sliding_window_view) base their result on a DummyArray that
            # holds the original in ``.base``: follow it, so that such a view is checked
            # against its allocation instead of pickled as a copy read past the mapping.
            inner = getattr(obj, "base", None) if hasattr(obj, "__array_interface__") else None
            if isinstance(inner, np.ndarray):
                obj = inner
                continue
            break
        if obj.base is None:
            return None
        obj = obj.base
    return obj if hasattr(obj, "_pin") else None


def _extent(arr: np.ndarray) -> tuple[int, int]:
    """[lo, hi) byte addresses the array's elements touch (negative strides included)."""
    lo = hi = arr.__array_interface__["data"][0]
    for n, stride in zip(arr.shape, arr.strides, strict=True):
        if stride < 0:
            lo += stride * (n - 1)
        else:
            hi += stride * (n - 1)
    return lo, hi + arr.itemsize


def is_shared(arr: object) -> bool:
    """Whether pickling ``arr`` sends shared memory (not a copy)."""
    return (
        isinstance(arr, np.ndarray)
        and arr.size > 0
        and _pin_of(arr) is not None
        and _region_of(arr, strict=False) is not None
    )


def _region_of(arr: np.ndarray, strict: bool) -> Any:
    from .backends import Allocation, ImportedMemory

    reg = get_registry()
    lo, hi = _extent(arr)
    try:
        region, _ = reg.check_range(lo, hi - lo)
    except HipError:
        if strict:
            raise HipError(
                hipError_t.hipErrorInvalidValue,
                "this array views hipipc memory this process no longer holds "
                "(freed or closed since, its mapping living on in the view, or "
                "inherited over fork) or its elements reach outside their "
                "allocation (as_strided), so it cannot be shared; send a copy "
                "(np.array(x)), or keep the buffer open and send it from its "
                "owner",
            ) from None
        return None
    return region if isinstance(region, (Allocation, ImportedMemory)) else None


def _shared_spec(arr: np.ndarray) -> tuple[Any, ...] | None:
    if arr.size == 0 or _pin_of(arr) is None:
        return None
    from .backends import Allocation

    region = _region_of(arr, strict=True)
    if region is None:
        return None
    reg = get_registry()
    ticket = None
    if isinstance(region, Allocation):
        handle = reg.export(region.ptr)  # first use publishes it
        ticket = reg.issue_ticket(handle)
    else:
        handle = region.handle
    offset = arr.__array_interface__["data"][0] - region.ptr
    return (
        bytes(handle),
        ticket,
        offset,
        arr.shape,
        arr.strides,
        arr.dtype.str if not arr.dtype.fields else arr.dtype,
    )


def _rebuild_array(
    raw: bytes,
    ticket: bytes | None,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: Any,
) -> SharedArray:
    """Unpickle: the same bytes, same layout, zero-copy; the array keeps the memory open."""
    from .buffer import DeviceBuffer

    handle = IpcMemHandle.coerce(raw)
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise HipError(
            hipError_t.hipErrorInvalidValue, f"a pickled array has no valid dtype: {exc}"
        ) from None
    if dt.hasobject:
        # Elements would be PyObject pointers read from shared memory: a crash at best.
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"a pickled array of dtype {dt} would hold Python objects, which shared memory cannot",
        )
    reg = get_registry()
    try:
        # An import; in the exporting process an alias of its DeviceBuffer, if it has one.
        root = DeviceBuffer.from_handle(handle, ticket)
    except HipError as exc:
        own = reg.own_pointer(handle)
        if exc.code != hipError_t.hipErrorInvalidContext or own is None:
            raise
        # Read back in the exporting process, which holds the bare allocation (hipMalloc).
        if ticket is not None:
            reg.backend.store.consume_ticket(handle, ticket)
        flat = _plain(reg, own, handle.size)
    else:
        flat = root.asarray(np.uint8)  # the array keeps root (the import) alive
    try:
        arr = np.ndarray(shape, dt, buffer=flat, offset=offset, strides=strides)
    except (TypeError, ValueError, OverflowError) as exc:
        raise HipError(
            hipError_t.hipErrorInvalidValue, f"a pickled array does not fit its allocation: {exc}"
        ) from None
    return cast(SharedArray, arr.view(SharedArray))  # numpy's stubs: np.ndarray(...) is Any


def _plain(reg: Registry, ptr: int, size: int) -> NDArray[Any]:
    region, offset = reg.find(ptr)
    return reg.backend.asarray(region, offset, (size,), np.uint8)
