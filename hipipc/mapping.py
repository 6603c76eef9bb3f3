"""Shared file mappings made with libc's mmap, owned by reference count.

Why not ``mmap.mmap``: it duplicates the file descriptor and keeps the copy for the life of the
mapping, so thousands of allocations or imports would exhaust ``RLIMIT_NOFILE``; and its
``close()`` raises ``BufferError`` while a numpy view exports it.  A :class:`Mapping` holds no
descriptor, and every buffer it hands out keeps it alive: the pages are unmapped when the
runtime has released it *and* the last numpy/ctypes view has gone, never before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from typing import cast

from .errors import HipError, hipError_t

__all__ = ["Mapping", "map_file"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_raw_mmap = _libc.mmap
_raw_mmap.restype = ctypes.c_void_p
_raw_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value
# map_file's constant arguments as objects of the exact argtypes: ctypes passes those as they
# are, without its per-argument conversion (an isinstance check and a new argument object).
_C_NULL = ctypes.c_void_p(None)
_C_PROT_RW = ctypes.c_int(_PROT_RW)
_C_MAP_SHARED = ctypes.c_int(_MAP_SHARED)

# Bumped in a forked child: a mapping made before the fork takes a fresh lock before its next
# use (a parent thread pinning or unpinning it at fork time left the child's copy held, and
# the child's views outlive the registry, so forget() does not reach every mapping).
_fork_gen = 0
_swap_lock = threading.Lock()


def _after_fork_in_child() -> None:  # cannot fail: plain assignments
    global _fork_gen, _swap_lock
    _fork_gen += 1
    _swap_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int | None:
    """libc's mmap, refusing (ENOMEM) a length or offset its C types cannot hold: ctypes
    would silently keep the low 64 bits, mapping a few pages for a huge request while the
    caller believes it has the whole length."""
    if not 0 < length <= sys.maxsize or not 0 <= offset <= sys.maxsize:
        ctypes.set_errno(errno.ENOMEM)
        return _MAP_FAILED
    return cast("int | None", _raw_mmap(addr, length, prot, flags, fd, offset))  # c_void_p


class Mapping:
    """``length`` bytes of a shared file mapping at address ``addr``.

    The mapping is unmapped once :meth:`release` has been called and no buffer from
    :meth:`buffer` is alive.  ``release`` is idempotent and never raises.
    """

    __slots__ = ("addr", "length", "_live", "_released", "_lock_", "_gen", "__weakref__")

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        self._live = 0
        self._released = False
        self._lock_ = threading.Lock()
        self._gen = _fork_gen

    @property
    def _lock(self) -> threading.Lock:
        """The mapping's lock; a fresh one after fork (module comment at ``_fork_gen``)."""
        if self._gen != _fork_gen:
            with _swap_lock:
                if self._gen != _fork_gen:
                    self._lock_ = threading.Lock()
                    self._gen = _fork_gen
        return self._lock_

    @_lock.setter
    def _lock(self, lock: threading.Lock) -> None:
        self._lock_ = lock

    def pin(self, offset: int, nbytes: int) -> _Pin:
        """An object that keeps ``[addr+offset, addr+offset+nbytes)`` mapped while it lives.

        Raises ``hipErrorInvalidValue`` once the mapping was released with no pin left: the
        check and the count are one step under the lock, so a concurrent :meth:`release`
        either comes first (this raises, nothing is touched) or waits for the pin to go (the
        caller works on the old pages, never on whatever is mapped at the address later).
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise HipError(hipError_t.hipErrorInvalidValue, "view outside the mapping")
        with self._lock:
            if self._released and self._live == 0:
                raise HipError(
                    hipError_t.hipErrorInvalidValue,
                    "the memory was freed or closed (mapping already released)",
                )
            self._live += 1
        # Made after the count: if _Pin() itself failed the count would leak, not the pages.
        return _Pin(self)

    def buffer(self, offset: int, nbytes: int) -> ctypes.Array[ctypes.c_char]:
        """A writable buffer over ``[addr+offset, addr+offset+nbytes)`` that pins the mapping."""
        pin = self.pin(offset, nbytes)
        arr = (ctypes.c_char * nbytes).from_address(self.addr + offset)
        # The ctypes array is the object numpy's views reference; when it dies, so does the pin.
        arr._pin = pin  # type: ignore[attr-defined]  # ctypes arrays take attributes
        return arr

    def view(
        self, offset: int, nbytes: int, typestr: str = "|u1", shape: tuple[int, ...] | None = None
    ) -> ArrayView:
        """``[addr+offset, addr+offset+nbytes)`` as an object numpy wraps without a copy
        (``numpy.asarray``: a writable C-contiguous array whose ``base`` it is; by default 1-D
        ``uint8``, else of ``typestr`` and ``shape``, which must span exactly ``nbytes``) and
        that pins the mapping, as :meth:`buffer` does.  Cheaper than :meth:`buffer` (no ctypes
        array type is made for the length: a new type costs tens of microseconds the first
        time, and ctypes keeps every one forever)."""
        pin = self.pin(offset, nbytes)
        return ArrayView(self.addr + offset, (nbytes,) if shape is None else shape, typestr, pin)

    def _unpin(self) -> None:
        with self._lock:
            self._live -= 1
            unmap = self._released and self._live == 0
        if unmap:
            self._unmap()

    def release(self) -> None:
        """Give up the runtime's reference; unmaps now unless a view is still alive."""
        # The lock without the property's call when no fork happened since (the common case:
        # every close of an import comes here).
        with self._lock_ if self._gen == _fork_gen else self._lock:
            if self._released:
                return
            self._released = True
            unmap = self._live == 0
        if unmap:
            addr, self.addr = self.addr, 0  # _unmap, inline
            if addr:
                _munmap(addr, self.length)

    def _unmap(self) -> None:
        addr, self.addr = self.addr, 0
        if addr:
            _munmap(addr, self.length)


class _Pin:
    __slots__ = ("_mapping",)

    def __init__(self, mapping: Mapping) -> None:
        self._mapping = mapping

    def __del__(self) -> None:
        try:
            self._mapping._unpin()
        except Exception:  # destructors never raise
            pass


class ArrayView:
    """A range of a mapping in numpy's array interface, holding the range's pin: the arrays
    numpy makes from it (and their views) keep it, hence the pages, alive.  Takes other
    attributes too, as the ctypes array of :meth:`Mapping.buffer` does (a
    :class:`~hipipc.buffer.DeviceBuffer` hangs itself on it to live as long as its arrays)."""

    def __init__(self, addr: int, shape: tuple[int, ...], typestr: str, pin: _Pin) -> None:
        self.__array_interface__ = {
            "data": (addr, False),  # (address, read-only)
            "shape": shape,
            "typestr": typestr,
            "version": 3,
        }
        self._pin = pin


# Warm ctypes' call path at import (issue 15's cold path): a process's first foreign call
# costs tens of microseconds more than the next.  Both calls fail at once with EINVAL (a
# zero length) and change nothing.
_raw_mmap(None, 0, 0, 0, -1, 0)
_munmap(0, 0)


def map_file(fd: int, length: int, offset: int) -> Mapping:
    """Map ``length`` bytes of ``fd`` at ``offset`` (page aligned), shared and read-write.

    The descriptor may be closed right after: the mapping does not need it.
    Raises ``HipError(hipErrorOutOfMemory)`` when the address space or map count is exhausted,
    ``hipErrorMapFailed`` for any other mmap failure.
    """
    if 0 < length <= sys.maxsize and 0 <= offset <= sys.maxsize:  # _mmap's test, inline
        addr = _raw_mmap(_C_NULL, length, _C_PROT_RW, _C_MAP_SHARED, fd, offset)
    else:
        addr = _mmap(None, length, _PROT_RW, _MAP_SHARED, fd, offset)  # ENOMEM
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        code = (
            hipError_t.hipErrorOutOfMemory if err == errno.ENOMEM else hipError_t.hipErrorMapFailed
        )
        raise HipError(code, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return Mapping(addr, length)
