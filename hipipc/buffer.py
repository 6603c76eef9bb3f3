"""A Pythonic device buffer: an allocation or an import, with views, DLPack and pickling.

:class:`DeviceBuffer` wraps the hip* calls of :mod:`hipipc.runtime` in an object that knows its
side (owner or importer) and state, closes in ``close()``/``with``/garbage collection, and
plugs into :mod:`multiprocessing` through ``__reduce__``: sending a buffer through a ``Queue``,
``Pipe`` or ``Pool`` sends only its 64-byte handle, and the receiver gets a buffer already
opened (``hipIpcOpenMemHandle``) that is closed (``hipIpcCloseMemHandle``) when it drops it.

Lifetime rule (CUDA's, unchanged): the exporter must keep its buffer alive until every receiver
has opened it.  ``multiprocessing.Queue.put`` returns before the handle is even pickled (a
feeder thread sends it), so closing right after ``put`` races the receiver, which then gets
``hipErrorInvalidResourceHandle``.  Wait for the receiver's reply (or ``Pool.map``'s result)
before closing.  Once opened, an import stays valid after the exporter frees (host backend).

Unpickling in the exporting process itself (CUDA and HIP refuse to open a handle there,
``hipErrorInvalidContext``) returns a non-owning *alias* of the live owner buffer: same
pointer, ``is_owner`` false, and it keeps the owner alive until the alias is closed.  So
``copy.deepcopy(buf)`` or a ``Queue`` read back in the sending process work as expected.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np

from . import runtime
from .errors import HipError, hipError_t
from .handle import IpcMemHandle

__all__ = ["DeviceBuffer"]

# Owner buffers of this process by segment name, so that unpickling a handle this process
# exported finds the allocation instead of failing with hipErrorInvalidContext.
_owners: weakref.WeakValueDictionary[str, DeviceBuffer] = weakref.WeakValueDictionary()
_owners_lock = threading.Lock()


def _fresh_owners_lock() -> None:
    # Another thread may have held the lock when the process forked: the child's copy would
    # stay locked forever.
    global _owners_lock
    _owners_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_owners_lock)

_OWNER, _IMPORT, _ALIAS = "owner", "import", "alias"


def _closed_error(what: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue,
                    f"{what} on a closed DeviceBuffer (it was closed, freed, or garbage "
                    "collected; keep a reference while you use it)")


class DeviceBuffer:
    """Device memory this process allocated or opened from another process's handle.

    Make one with :meth:`allocate` (owner: ``hipMalloc``, freed by ``close``) or :meth:`open`
    (importer: ``hipIpcOpenMemHandle``, ``hipIpcCloseMemHandle`` on ``close``).  ``close`` is
    idempotent; the garbage collector closes a buffer that is dropped (quietly: a destructor
    never raises).  Numpy views from :meth:`asarray` stay valid after ``close`` (the mapping is
    released with the last view), but pointer arithmetic on :attr:`ptr` does not.

    Pickling sends the 64-byte handle (exporting an owner on first use) and nothing else; see
    the module docstring for the lifetime rule and the same-process case.  In a forked child
    an inherited buffer is inert: ``close`` there only marks it closed (the child's runtime
    does not own the parent's memory) and views raise ``hipErrorInvalidContext``; send the
    buffer to the child instead, which then opens its own import.
    """

    __slots__ = ("_ptr", "_size", "_device", "_handle", "_role", "_target", "_pid", "_lock",
                 "__weakref__")

    def __init__(self) -> None:
        raise TypeError("use DeviceBuffer.allocate(nbytes) or DeviceBuffer.open(handle)")

    @classmethod
    def _make(cls, ptr: int, size: int, device: int, handle: IpcMemHandle | None, role: str,
              target: DeviceBuffer | None = None) -> DeviceBuffer:
        self = object.__new__(cls)
        self._ptr = ptr
        self._size = size
        self._device = device
        self._handle = handle
        self._role = role
        self._target = target  # aliases keep their owner alive
        self._pid = os.getpid()
        self._lock = threading.Lock()
        return self

    # -- construction --------------------------------------------------------------------

    @classmethod
    def allocate(cls, nbytes: int, *, device: int | None = None) -> DeviceBuffer:
        """Allocate ``nbytes`` (> 0) with ``hipMalloc`` on ``device`` (default: current).

        Raises ``hipErrorInvalidValue`` for a size that is not a positive integer,
        ``hipErrorInvalidDevice`` for a bad device, ``hipErrorOutOfMemory`` when full.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
            raise HipError(hipError_t.hipErrorInvalidValue,
                           f"DeviceBuffer.allocate needs a positive byte count, got {nbytes!r}")
        previous = runtime.hipGetDevice()
        if device is not None:
            runtime.hipSetDevice(device)
        try:
            ptr = runtime.hipMalloc(int(nbytes))
            dev = runtime.hipGetDevice()
        finally:
            if device is not None:
                runtime.hipSetDevice(previous)
        return cls._make(ptr, int(nbytes), dev, None, _OWNER)

    @classmethod
    def open(cls, handle: IpcMemHandle | bytes | bytearray | memoryview) -> DeviceBuffer:
        """Open memory another process exported (``hipIpcOpenMemHandle``).

        ``handle`` is an :class:`IpcMemHandle` or its 64 raw bytes.  Raises what
        ``hipIpcOpenMemHandle`` raises: ``hipErrorInvalidValue`` for malformed bytes,
        ``hipErrorInvalidContext`` in the exporting process (use :meth:`from_handle` there),
        ``hipErrorInvalidResourceHandle`` for memory that is gone or not shared with this user.
        """
        handle = IpcMemHandle.coerce(handle)
        ptr = runtime.hipIpcOpenMemHandle(handle, runtime.hipIpcMemLazyEnablePeerAccess)
        return cls._make(ptr, handle.size, handle.device, handle, _IMPORT)

    @classmethod
    def from_handle(cls, handle: IpcMemHandle | bytes | bytearray | memoryview
                    ) -> DeviceBuffer:
        """Like :meth:`open`, but in the exporting process return an alias of its owner buffer.

        This is what unpickling does.  Raises ``hipErrorInvalidContext`` when this process
        exported the handle through the bare ``hipIpcGetMemHandle`` (no owner buffer exists
        to alias: use that pointer directly).
        """
        handle = IpcMemHandle.coerce(handle)
        with _owners_lock:
            owner = _owners.get(handle.segment_name)
        if owner is not None and not owner.closed and owner._pid == os.getpid():
            return cls._make(owner._ptr, owner._size, owner._device, handle, _ALIAS, owner)
        return cls.open(handle)

    # -- state ---------------------------------------------------------------------------

    @property
    def ptr(self) -> int:
        """The device pointer (``hipErrorInvalidValue`` once closed)."""
        if not self._ptr:
            raise _closed_error("ptr")
        return self._ptr

    def _check_process(self, what: str) -> int:
        ptr = self.ptr
        if self._pid != os.getpid():
            raise HipError(hipError_t.hipErrorInvalidContext,
                           f"{what}: this DeviceBuffer was inherited over fork and belongs to "
                           f"process {self._pid}; send it to the child (pickle, Queue, Pool) "
                           "so that the child opens its own import")
        return ptr

    @property
    def size(self) -> int:
        """Size in bytes (kept after close)."""
        return self._size

    nbytes = size

    @property
    def device(self) -> int:
        """The device ordinal the memory lives on."""
        return self._device

    @property
    def is_owner(self) -> bool:
        """True for memory this object allocated (and frees on close)."""
        return self._role == _OWNER

    @property
    def closed(self) -> bool:
        return not self._ptr

    @property
    def handle(self) -> IpcMemHandle:
        """The 64-byte handle: an owner exports on first use; an importer has the one it opened."""
        return self.export()

    def export(self, share: str | None = None) -> IpcMemHandle:
        """``hipIpcGetMemHandle`` of an owner buffer (``share``: user/group/all, first export).

        An importer or alias returns the handle it was opened with (forwarding it to a third
        process is fine while the exporter keeps the memory); ``share`` is then refused with
        ``hipErrorInvalidValue``: only the exporter decides who may open its memory.
        """
        if self._handle is not None and (self._role != _OWNER or self._pid != os.getpid()):
            if share is not None:
                raise HipError(hipError_t.hipErrorInvalidValue,
                               "only the exporting process can set the sharing policy")
            return self._handle
        ptr = self._check_process("export")
        handle = runtime.hipIpcGetMemHandle(ptr, share=share)
        if self._handle is None:
            self._handle = handle
            with _owners_lock:
                _owners[handle.segment_name] = self
        return handle

    # -- views ---------------------------------------------------------------------------

    def asarray(self, dtype: Any = np.uint8, shape: int | tuple[int, ...] | None = None
                ) -> Any:
        """A zero-copy array over the buffer (numpy for host memory, CuPy for GPU memory).

        ``shape`` defaults to as many ``dtype`` items as fit.  The view keeps the memory mapped
        even after :meth:`close`.  Raises ``hipErrorInvalidValue`` if the shape does not fit.
        """
        ptr = self._check_process("asarray")
        dt = np.dtype(dtype)
        if shape is None:
            shape = self._size // dt.itemsize
        return runtime.asarray(ptr, shape, dt)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(buf)``: the bytes as a zero-copy ``uint8`` array (numpy's copy rules)."""
        arr = self.asarray()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError("converting a DeviceBuffer to another dtype needs a copy; "
                                 "use buf.asarray(dtype) for a zero-copy typed view")
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # -- host protocols: buffer, array interface, len, DLPack -------------------------------
    # All of them export the same zero-copy view (``_host_view``), which owns a reference to
    # the mapping: a consumer's array or memoryview stays valid after ``close`` like any view
    # from ``asarray``, never a dangling pointer.  A typed view goes through ``asarray``:
    # ``np.from_dlpack(buf.asarray(np.float32, (4, 4)))`` has that dtype and shape.

    def _host_view(self) -> np.ndarray:
        return self.asarray()

    def __len__(self) -> int:
        """The size in bytes (the length of ``memoryview(buf)``); kept after ``close``."""
        return self._size

    def __buffer__(self, flags: int) -> memoryview:
        """The buffer protocol (PEP 688, Python >= 3.12): ``memoryview(buf)``, writable bytes.

        Raises ``hipErrorInvalidValue`` once closed.  On Python 3.10 and 3.11, which have no
        Python-level buffer protocol, use ``memoryview(buf.asarray())``.
        """
        return memoryview(self._host_view())

    def __release_buffer__(self, view: memoryview) -> None:
        view.release()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface (version 3): the bytes as ``uint8``, zero-copy and writable.

        ``data`` is a memoryview of the view rather than a raw address, so the array numpy
        builds holds the mapping alive.  Raises ``hipErrorInvalidValue`` once closed.
        """
        view = self._host_view()
        return {"version": 3, "shape": view.shape, "typestr": view.dtype.str,
                "data": memoryview(view), "strides": None}

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack capsule of a byte view (host memory: kDLCPU); keeps the mapping alive.

        The keywords (``stream``, ``max_version``, ``dl_device``, ``copy``) are numpy's.
        """
        return self._host_view().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCPU = 1, 0)`` for host memory."""
        return self._host_view().__dlpack_device__()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Free (owner) or close (importer) the memory; idempotent.

        An alias only drops its reference to the owner.  Raises what ``hipFree`` or
        ``hipIpcCloseMemHandle`` raise, which happens only if the pointer was released behind
        this object's back (for example with a bare ``hipFree``).
        """
        with self._lock:
            ptr, self._ptr = self._ptr, 0
            target, self._target = self._target, None
        del target  # an alias lets go of its owner here (which may free it, if last)
        if not ptr or self._pid != os.getpid():
            return  # closed already, or inherited over fork: the parent owns it
        if self._role == _OWNER:
            if self._handle is not None:
                with _owners_lock:
                    if _owners.get(self._handle.segment_name) is self:
                        del _owners[self._handle.segment_name]
            runtime.hipFree(ptr)
        elif self._role == _IMPORT:
            runtime.hipIpcCloseMemHandle(ptr)

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # destructors never raise; interpreter shutdown may have torn down
            pass

    # -- pickling ------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Pickle as the 64-byte handle; the receiver opens it (see the module docstring)."""
        if self.closed:
            raise _closed_error("pickling (sending)")
        return (_rebuild, (bytes(self.export()),))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"ptr={self._ptr:#x}"
        ident = f", id={self._handle.fingerprint}" if self._handle is not None else ""
        return (f"<DeviceBuffer {self._role} {state} size={self._size} "
                f"device={self._device}{ident}>")


def _rebuild(raw: bytes) -> DeviceBuffer:
    return DeviceBuffer.from_handle(raw)
