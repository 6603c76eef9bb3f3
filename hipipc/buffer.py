"""A Pythonic device buffer: an allocation or an import, with views, DLPack and pickling.

:class:`DeviceBuffer` wraps the hip* calls of :mod:`hipipc.runtime` in an object that knows its
side (owner or importer) and state, closes in ``close()``/``with``/garbage collection, and
plugs into :mod:`multiprocessing` through ``__reduce__``: sending a buffer through a ``Queue``,
``Pipe`` or ``Pool`` sends only its 64-byte handle, and the receiver gets a buffer already
opened (``hipIpcOpenMemHandle``) that is closed (``hipIpcCloseMemHandle``) when it drops it.

Send-and-drop (torch's ``q.put(t); del t``; CuPy sending a temporary).  The exporter may
drop its buffer right after handing it to a channel: every pickle carries, besides the handle,
the secret of a one-time *ticket*, an extra hard link of the segment in the exporter's store
(named by a one-way digest of the secret, :func:`hipipc.store.ticket_name`).  The protocol:

1. Pickling an owner buffer (or a view, alias, or shared array of it) in its process exports
   it (first time) and links a fresh ticket; the pickle holds handle, ticket secret, byte
   offset and size.  Pickling an *import* (forwarding) sends the handle without a ticket: the
   exporter still decides the lifetime.
2. Unpickling opens through the ticket (same checks as ``hipIpcOpenMemHandle``: owner, mode,
   header identity in constant time, exporter alive), then unlinks it; if the ticket is gone
   (this pickle was unpickled before) it opens the main name.  In the exporting process it
   returns an alias of the live owner and unlinks the ticket.
3. Dropping or closing the owner revokes the main name at once (``hipFree``, CUDA's rule):
   raw handles stop opening, but tickets already handed out stay valid until consumed.  The
   memory itself is released when the owner and every receiver have dropped their objects
   (a mapping or a name holds the file).
4. At the sender's exit (the exit rule, :mod:`hipipc.registry`) every ticket not consumed yet
   is unlinked with the exports, so a receiver that unpickles later gets
   ``hipErrorInvalidResourceHandle``; after a kill -9 of the sender, the next open refuses
   and reclaims them (the header names the dead exporter) and ``hipipc gc`` sweeps the rest.

So a loop that sends and drops buffers holds at most the buffers in flight in the channel.
Limits: a pickle that is never unpickled keeps its memory until the sender exits; a receiver
of another user (``HIPIPC_SHARE``) cannot unlink a ticket in the exporter's store, so that
ticket too lives until the sender exits.  Unpickling the same bytes twice: the second opens
the main name (fails once the owner dropped it).

Views: ``buf[3:9]`` is a 6-byte view at offset 3 that shares the allocation's lifetime (it
keeps the buffer alive); it pickles with its offset and size and arrives as a view of the same
bytes (CUDA exports whole allocations and loses the offset; numba, torch and CuPy carry it).
A 0-byte buffer (``allocate(0)``, ``hipMalloc(0)``'s null pointer) or view pickles too and
arrives empty.

Unpickling in the exporting process itself (CUDA and HIP refuse to open a handle there,
``hipErrorInvalidContext``) returns a non-owning *alias* of the live owner buffer: same
pointer, ``is_owner`` false, and it keeps the owner alive until the alias is closed.  So
``copy.deepcopy(buf)`` or a ``Queue`` read back in the sending process work as expected.
"""

from __future__ import annotations

import math
import operator
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import runtime
from .errors import HipError, hipError_t, short_repr
from .handle import IpcMemHandle
from .registry import get_registry

if TYPE_CHECKING:
    # ndarray has the C buffer protocol; numpy's stubs declare __buffer__ only for 3.12+.
    from typing_extensions import Buffer

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

_OWNER, _IMPORT, _ALIAS, _VIEW, _EMPTY = "owner", "import", "alias", "view", "empty"


def _released_error(what: str) -> HipError:
    return HipError(
        hipError_t.hipErrorInvalidValue,
        f"{what}: this DeviceBuffer's memory was released behind its back "
        "(hipDeviceReset, or a bare hipFree/hipIpcCloseMemHandle of its pointer); "
        "nothing was freed or closed now",
    )


def _closed_error(what: str) -> HipError:
    return HipError(
        hipError_t.hipErrorInvalidValue,
        f"{what} on a closed DeviceBuffer (it was closed, freed, or garbage "
        "collected; keep a reference while you use it)",
    )


class DeviceBuffer:
    """Device memory this process allocated or opened from another process's handle.

    Make one with :meth:`allocate` (owner: ``hipMalloc``, freed by ``close``) or :meth:`open`
    (importer: ``hipIpcOpenMemHandle``, ``hipIpcCloseMemHandle`` on ``close``).  ``close`` is
    idempotent; the garbage collector closes a buffer that is dropped (quietly: a destructor
    never raises).  Numpy views from :meth:`asarray` stay valid after ``close`` (the mapping is
    released with the last view), but pointer arithmetic on :attr:`ptr` does not.

    Pickling sends the 64-byte handle (exporting an owner on first use), a one-time ticket
    and the view's offset and size; see the module docstring for the send-and-drop protocol
    and the same-process case.  ``buf[a:b]`` is a view sharing the allocation's lifetime.
    In a forked child an inherited buffer is inert: ``close`` there only marks it closed
    (the child's runtime does not own the parent's memory) and views raise
    ``hipErrorInvalidContext``; send the buffer to the child instead, which then opens its
    own import.
    """

    __slots__ = (
        "_ptr",
        "_size",
        "_device",
        "_handle",
        "_role",
        "_target",
        "_pid",
        "_lock",
        "_offset",
        "_open",
        "_region",
        "__weakref__",
    )
    _ptr: int
    _size: int
    _device: int
    _handle: IpcMemHandle | None
    _role: str
    _target: DeviceBuffer | None
    _pid: int
    _lock: threading.Lock
    _offset: int
    _open: bool
    _region: Any

    def __init__(self) -> None:
        raise TypeError("use DeviceBuffer.allocate(nbytes) or DeviceBuffer.open(handle)")

    @classmethod
    def _make(
        cls,
        ptr: int,
        size: int,
        device: int,
        handle: IpcMemHandle | None,
        role: str,
        target: DeviceBuffer | None = None,
        offset: int = 0,
    ) -> DeviceBuffer:
        self = object.__new__(cls)
        self._offset = offset  # from the allocation's base (views)
        self._open = True
        self._ptr = ptr
        self._size = size
        self._device = device
        self._handle = handle
        self._role = role
        self._target = target  # aliases keep their owner alive
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # The registry's entry this object frees or closes (owner, import): if it is gone,
        # the memory was released behind this object's back (hipDeviceReset, a bare hipFree)
        # and the address may hold a new allocation that is not this object's to touch.
        self._region = get_registry().region_at(ptr) if role in (_OWNER, _IMPORT) and ptr else None
        return self

    # -- construction --------------------------------------------------------------------

    @classmethod
    def allocate(
        cls, nbytes: int, *, device: int | None = None, transport: str | None = None
    ) -> DeviceBuffer:
        """Allocate ``nbytes`` with ``hipMalloc`` on ``device`` (default: current).

        ``nbytes == 0`` gives an empty buffer (``ptr`` 0, as ``hipMalloc(0)``) that can be
        viewed and sent.  ``transport`` (``"store"``, ``"fd"`` or ``"auto"``) overrides the
        process's ``$HIPIPC_TRANSPORT`` for this allocation (see the README's Transports).
        Raises ``hipErrorInvalidValue`` for a size that is not an integer >= 0 or an unknown
        transport, ``hipErrorInvalidDevice`` for a bad device, ``hipErrorOutOfMemory`` when
        full, ``hipErrorNotSupported`` for ``"fd"`` on a kernel without it.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise HipError(
                hipError_t.hipErrorInvalidValue,
                f"DeviceBuffer.allocate needs a byte count >= 0, got {nbytes!r}",
            )
        if nbytes == 0:
            return cls._make(
                0, 0, runtime.hipGetDevice() if device is None else device, None, _EMPTY
            )
        previous = runtime.hipGetDevice()
        if device is not None:
            runtime.hipSetDevice(device)
        try:
            if transport is None:
                ptr = runtime.hipMalloc(int(nbytes))
            else:
                ptr = get_registry().allocate(int(nbytes), transport)
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
    def from_handle(
        cls, handle: IpcMemHandle | bytes | bytearray | memoryview, ticket: bytes | None = None
    ) -> DeviceBuffer:
        """Like :meth:`open`, but in the exporting process return an alias of its owner buffer.

        This is what unpickling does; ``ticket`` is a pickle's one-time ticket (module
        docstring).  Raises ``hipErrorInvalidContext`` when this process exported the handle
        through the bare ``hipIpcGetMemHandle`` (no owner buffer exists to alias: use that
        pointer directly).
        """
        handle = IpcMemHandle.coerce(handle)
        with _owners_lock:
            owner = _owners.get(handle.segment_name)
        reg = get_registry()
        if (
            owner is not None
            and not owner.closed
            and owner._pid == os.getpid()
            and not owner._released()
        ):
            if ticket is not None:
                reg.backend.store.consume_ticket(handle, ticket)
            return cls._make(owner._ptr, owner._size, owner._device, handle, _ALIAS, owner)
        if ticket is None:
            return cls.open(handle)
        ptr = reg.open(handle, ticket)
        return cls._make(ptr, handle.size, handle.device, handle, _IMPORT)

    # -- state ---------------------------------------------------------------------------

    @property
    def ptr(self) -> int:
        """The device pointer (``hipErrorInvalidValue`` once closed; 0 for an empty buffer)."""
        if self.closed:
            raise _closed_error("ptr")
        return self._ptr

    def _check_process(self, what: str) -> int:
        ptr = self.ptr
        if self._pid != os.getpid():
            raise HipError(
                hipError_t.hipErrorInvalidContext,
                f"{what}: this DeviceBuffer was inherited over fork and belongs to "
                f"process {self._pid}; send it to the child (pickle, Queue, Pool) "
                "so that the child opens its own import",
            )
        if self._released():
            raise _released_error(what)
        return ptr

    def _released(self) -> bool:
        """Whether the memory this buffer (or the buffer it views) holds was released
        behind its back: freed or closed by a bare hip* call or ``hipDeviceReset``."""
        root = self._root() if self._role == _VIEW else self
        if root is None:
            return False
        if root._role == _ALIAS:
            owner = root._target
            if owner is None:
                return False
            root = owner
        region = root._region
        return region is not None and get_registry().region_at(root._ptr) is not region

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
        """True once closed; a view is closed with the buffer it views."""
        target = self._target
        return not self._open or (self._role == _VIEW and target is not None and target.closed)

    @property
    def offset(self) -> int:
        """Byte offset from the start of the allocation (non-zero for views)."""
        return self._offset

    def _root(self) -> DeviceBuffer:
        """The buffer that holds the allocation: an owner, import or alias."""
        return self._target if self._role == _VIEW else self  # type: ignore[return-value]

    def __getitem__(self, key: slice) -> DeviceBuffer:
        """``buf[a:b]``: a view of bytes ``a`` to ``b`` sharing the allocation's lifetime.

        Only contiguous slices (step 1); raises ``TypeError`` for anything else.
        """
        if not isinstance(key, slice):
            raise TypeError(
                "a DeviceBuffer is indexed by contiguous slices (buf[3:9]); for "
                "elements use buf.asarray()[i]"
            )
        start, stop, step = key.indices(self._size)
        if step != 1:
            raise TypeError(
                "a DeviceBuffer view must be contiguous (slice step 1); use "
                "buf.asarray()[::step] for a strided array view"
            )
        if self._role == _EMPTY:
            if self.closed:
                raise _closed_error("slicing")
            return self._make(0, 0, self._device, None, _EMPTY)
        ptr = self._check_process("slicing")
        stop = max(start, stop)
        root = self._root()
        return self._make(
            ptr + start, stop - start, self._device, self._handle, _VIEW, root, self._offset + start
        )

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
        if self._role in (_VIEW, _EMPTY):
            if self._role == _EMPTY:
                raise HipError(
                    hipError_t.hipErrorInvalidValue,
                    "an empty buffer (0 bytes, null pointer) has no handle",
                )
            return self._root().export(share)
        if self._handle is not None and (self._role != _OWNER or self._pid != os.getpid()):
            if share is not None:
                raise HipError(
                    hipError_t.hipErrorInvalidValue,
                    "only the exporting process can set the sharing policy",
                )
            return self._handle
        ptr = self._check_process("export")
        handle = runtime.hipIpcGetMemHandle(ptr, share=share)
        if self._handle is None:
            self._handle = handle
            with _owners_lock:
                _owners[handle.segment_name] = self
        return handle

    # -- views ---------------------------------------------------------------------------

    def asarray(
        self, dtype: DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None
    ) -> NDArray[Any]:
        """A zero-copy array over the buffer (numpy for host memory, CuPy for GPU memory).

        ``shape`` defaults to as many ``dtype`` items as fit.  The array (a
        :class:`~hipipc.arrays.SharedArray`, pickled as shared memory) and its views keep this
        buffer alive while they live; after an explicit :meth:`close` they keep only the
        mapping (readable here, no longer shareable).  Raises ``hipErrorInvalidValue`` if the
        shape does not fit.
        """
        dt = np.dtype(dtype)
        if shape is None:
            if not dt.itemsize:
                raise HipError(
                    hipError_t.hipErrorInvalidValue,
                    f"asarray: dtype {dt} has no size; pass a shape",
                )
            shape = self._size // dt.itemsize
        # Python ints: np.prod would overflow (or wrap) for huge shapes.
        try:
            nbytes = (
                math.prod(
                    operator.index(n) for n in (shape if hasattr(shape, "__iter__") else (shape,))
                )
                * dt.itemsize
            )
        except TypeError:
            raise HipError(
                hipError_t.hipErrorInvalidValue,
                f"asarray: shape must be integers, not {short_repr(shape)}",
            ) from None
        if nbytes > self._size:
            raise HipError(
                hipError_t.hipErrorInvalidValue,
                f"asarray: {short_repr(shape)} of {dt} needs {nbytes} bytes, the "
                f"buffer has {self._size}",
            )
        if self._role == _EMPTY:
            if self.closed:
                raise _closed_error("asarray")
            from .arrays import SharedArray

            return np.empty(shape, dt).view(SharedArray)  # raises if the shape needs bytes
        ptr = self._check_process("asarray")
        arr = runtime.asarray(ptr, shape, dt)
        from .arrays import _pin_of

        pin = _pin_of(arr)
        if pin is not None:
            # The array keeps this buffer (so its allocation and export) alive, as a tensor
            # keeps its storage: dropping the buffer while arrays of it live frees nothing,
            # and the arrays can still be sent.  close() still frees at once.
            pin._hip_buffer = self
        return arr

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        """``np.asarray(buf)``: the bytes as a zero-copy ``uint8`` array (numpy's copy rules)."""
        arr = self.asarray()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(
                    "converting a DeviceBuffer to another dtype needs a copy; "
                    "use buf.asarray(dtype) for a zero-copy typed view"
                )
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # -- host protocols: buffer, array interface, len, DLPack -------------------------------
    # All of them export the same zero-copy view (``_host_view``), which owns a reference to
    # the mapping: a consumer's array or memoryview stays valid after ``close`` like any view
    # from ``asarray``, never a dangling pointer.  A typed view goes through ``asarray``:
    # ``np.from_dlpack(buf.asarray(np.float32, (4, 4)))`` has that dtype and shape.

    def _host_view(self) -> NDArray[Any]:
        return self.asarray()

    def __len__(self) -> int:
        """The size in bytes (the length of ``memoryview(buf)``); kept after ``close``."""
        return self._size

    def __buffer__(self, flags: int) -> memoryview:
        """The buffer protocol (PEP 688, Python >= 3.12): ``memoryview(buf)``, writable bytes.

        Raises ``hipErrorInvalidValue`` once closed.  On Python 3.10 and 3.11, which have no
        Python-level buffer protocol, use ``memoryview(buf.asarray())``.
        """
        return memoryview(cast("Buffer", self._host_view()))

    def __release_buffer__(self, view: memoryview) -> None:
        view.release()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface (version 3): the bytes as ``uint8``, zero-copy and writable.

        ``data`` is a memoryview of the view rather than a raw address, so the array numpy
        builds holds the mapping alive.  Raises ``hipErrorInvalidValue`` once closed.
        """
        view = self._host_view()
        return {
            "version": 3,
            "shape": view.shape,
            "typestr": view.dtype.str,
            "data": memoryview(cast("Buffer", view)),
            "strides": None,
        }

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
        if self._pid != os.getpid():
            # Inherited over fork: only mark it closed (the parent owns the memory), without
            # the lock, which a parent thread inside close() at fork time left held forever.
            self._open, self._target = False, None
            return
        with self._lock:
            was_open, self._open = self._open, False
            ptr = self._ptr
            target, self._target = self._target, None
        del target  # an alias or view lets go of its owner here (which may free it, if last)
        if not was_open or not ptr:
            return  # closed already
        if self._role in (_OWNER, _IMPORT) and self._released():
            # Never free or close what may now be another allocation at the same address.
            raise _released_error("close")
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

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as handle + one-time ticket + offset + size (the module docstring's
        send-and-drop protocol); the receiver opens it."""
        if self.closed:
            raise _closed_error("pickling (sending)")
        if self._role == _EMPTY or self._size == 0:
            return (_rebuild_empty, (self._device,))
        root = self._root()
        handle = self.export()
        ticket = None
        if root._role in (_OWNER, _ALIAS) and self._pid == os.getpid():
            ticket = get_registry().issue_ticket(handle)
        return (_rebuild, (bytes(handle), ticket, self._offset, self._size))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"ptr={self._ptr:#x}"
        if self._role == _VIEW:
            state += f" offset={self._offset}"
        ident = f", id={self._handle.fingerprint}" if self._handle is not None else ""
        return f"<DeviceBuffer {self._role} {state} size={self._size} device={self._device}{ident}>"


def _rebuild(
    raw: bytes, ticket: bytes | None = None, offset: int = 0, size: int | None = None
) -> DeviceBuffer:
    # Checked before opening: a hand-made pickle may carry anything here.
    if type(offset) is not int or not (size is None or type(size) is int):
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"a pickled view has offset {offset!r} and size {size!r}: not integers",
        )
    root = DeviceBuffer.from_handle(raw, ticket)
    if offset == 0 and (size is None or size == root.size):
        return root
    if offset < 0 or size is None or size < 0 or offset + size > root.size:
        root.close()
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"a pickled view of {size} bytes at offset {offset} does not fit its "
            f"allocation of {root.size} bytes",
        )
    return root[offset : offset + size]  # the view holds the import; closed when dropped


def _rebuild_empty(device: int) -> DeviceBuffer:
    if type(device) is not int or not 0 <= device < 1 << 32:  # a hand-made pickle's
        raise HipError(
            hipError_t.hipErrorInvalidDevice, f"a pickled empty buffer names device {device!r}"
        )
    return DeviceBuffer._make(0, 0, device, None, _EMPTY)
