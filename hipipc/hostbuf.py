"""Host buffers: the one place where a caller's buffer object becomes a raw address.

A host buffer is any C-contiguous object with the buffer protocol (numpy array, bytearray,
memoryview, bytes as a source).  A buffer whose items are Python objects (a numpy ``object``
array, a structured dtype with an object field, a ctypes ``py_object`` array, any buffer
whose format holds ``O``) is refused with ``hipErrorInvalidValue``: its bytes are PyObject
pointers, so copying device memory into it would let whoever writes that memory choose the
pointers the interpreter follows (a crash at best), and copying it out would hand heap
addresses to other processes.
"""

from __future__ import annotations

import re
from typing import Any, cast

import numpy as np

from .errors import HipError, hipError_t

__all__: list[str] = []  # internal: not part of the flat public namespace

# PEP 3118 struct formats name their fields between colons ("T{<l:count:O:obj:}"); drop the
# names so a field called "Obj" is not read as the object code.
_FIELD_NAMES = re.compile(r":[^:]*:")


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def holds_objects(buf: Any) -> bool:
    """True if ``buf``'s memory holds Python object pointers (numpy's ``hasobject``, or an
    ``O`` in its buffer format)."""
    kind = type(buf)
    if kind is bytearray or kind is bytes:  # the common cases, without a memoryview
        return False
    if isinstance(buf, np.ndarray):
        return cast(bool, buf.dtype.hasobject)  # numpy's stubs: Any
    dtype = getattr(buf, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.hasobject:
        return True
    try:
        if kind is memoryview:
            fmt = buf.format
        else:
            with memoryview(buf) as view:
                fmt = view.format
    except (TypeError, ValueError, BufferError):
        return False  # not a buffer (or a released view): the caller's own check says so
    return "O" in fmt and "O" in _FIELD_NAMES.sub("", fmt)


def refuse_objects(buf: Any, what: str) -> None:
    """Raise ``hipErrorInvalidValue`` if ``buf`` holds Python objects (see the module doc)."""
    if holds_objects(buf):
        raise _invalid(
            f"{what} holds Python objects (a numpy object array or a buffer of "
            "format 'O'), whose bytes are interpreter pointers, not data: refusing "
            "to copy raw memory into or out of it; use a numeric dtype"
        )


def host_address(buf: Any, nbytes: int, writable: bool, what: str) -> tuple[int, Any]:
    """Address of a host buffer with at least ``nbytes``, and the object that keeps it alive.

    Raises ``hipErrorInvalidValue`` for an object without a C-contiguous buffer, one that
    holds Python objects, one shorter than ``nbytes``, or a read-only one when ``writable``.
    """
    refuse_objects(buf, what)
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise _invalid(
            f"{what} must be a C-contiguous buffer (numpy array, bytearray, "
            f"memoryview) or, for a device side, an int pointer: {exc}"
        ) from None
    if arr.size < nbytes:
        raise _invalid(f"{what} holds {arr.size} bytes, {nbytes} needed")
    if writable and not arr.flags.writeable:
        raise _invalid(f"{what} is read-only")
    return arr.__array_interface__["data"][0], arr
