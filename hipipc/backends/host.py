"""The host backend: "device" memory is a POSIX shared-memory segment on /dev/shm.

Pointers are the real virtual addresses of shared file mappings, so numpy, ctypes and DLPack
consumers can use them directly.  ``HIPIPC_HOST_DEVICES`` (default 1) sets how many logical
devices exist; a device ordinal is only a label recorded in the handle.  Streams and events
live in :mod:`.host_streams`; an interprocess event's state is one page of a store segment,
exported, opened, revoked and collected exactly like memory.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from ..errors import HipError, hipError_t, short_repr
from ..events import hipEventDisableTiming, hipEventInterprocess
from ..fdtransport import own_description
from ..handle import HandleKind, IpcEventHandle, IpcHandle, IpcMemHandle
from ..mapping import Mapping, map_file
from ..segstore import Transports
from ..store import PAGE_SIZE, _os_call
from .base import Allocation, Backend, ImportedMemory, Region
from .eventstate import STATE_SIZE, EventState
from .host_device import HostDeviceMixin
from .host_streams import HostEvent, HostStream, NullStream

__all__ = ["HostBackend"]

DEVICES_ENV = "HIPIPC_HOST_DEVICES"
_HOST_KINDS = (HandleKind.HOST_MEMORY, HandleKind.HOST_EVENT)
_H = TypeVar("_H", bound=IpcHandle)


def _mapped_length(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


@dataclass(eq=False)
class _Owned:
    mapping: Mapping
    fd: int  # the unnamed segment's descriptor, needed until it is linked; then -1


class HostBackend(HostDeviceMixin, Backend):
    """Memory in store segments, mapped shared; copies are ``memmove`` (GIL released)."""

    name = "host"
    memory_kind = HandleKind.HOST_MEMORY

    def __init__(self, store: Transports) -> None:
        super().__init__(store)
        self._null_stream = NullStream()
        self._pid = os.getpid()

    def device_count(self) -> int:
        raw = os.environ.get(DEVICES_ENV, "1")
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1:
            raise HipError(
                hipError_t.hipErrorNoDevice,
                f"${DEVICES_ENV}={short_repr(raw)} must be a positive integer",
            )
        return count

    def _new_segment(
        self,
        handle_type: type[_H],
        kind: HandleKind,
        size: int,
        device: int,
        transport: str | None = None,
    ) -> tuple[_H, int, Mapping]:
        """A fresh handle and its unexported segment, mapped: (handle, descriptor, mapping)."""
        handle, fd = self.store.new_segment(handle_type, kind, size, device, transport=transport)
        try:
            return handle, fd, map_file(fd, _mapped_length(size), PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise

    def _open_segment(self, handle: IpcHandle, ticket: bytes | None = None) -> Mapping:
        """Map the segment another process exported under ``handle`` (through ``ticket``)."""
        fd, mapping = self._open_and_map(handle, ticket)
        os.close(fd)
        return mapping

    def _open_and_map(self, handle: IpcHandle, ticket: bytes | None = None) -> tuple[int, Mapping]:
        """Open and map the segment ``handle`` names (through ``ticket``): (its descriptor,
        the mapping)."""
        fd = self.store.open(handle, ticket)  # first: a handle that names nothing says so
        try:
            if handle.kind not in _HOST_KINDS:
                raise HipError(
                    hipError_t.hipErrorNotSupported,
                    f"the handle names {handle.kind.name} but this process runs "
                    "the host backend (set HIPIPC_BACKEND to match the exporter)",
                )
            return fd, map_file(fd, _mapped_length(handle.size), PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise

    def allocate(self, nbytes: int, device: int, transport: str | None = None) -> Allocation:
        handle, fd, mapping = self._new_segment(
            IpcMemHandle, HandleKind.HOST_MEMORY, nbytes, device, transport
        )
        return Allocation(mapping.addr, nbytes, device, handle, _Owned(mapping, fd))

    def export(self, alloc: Allocation, mode: int) -> None:
        owned: _Owned = alloc.state
        transport = self.store.route(alloc.handle)
        transport.publish(owned.fd, alloc.handle, mode)
        # The store's name now keeps the file alive and the mapping needs no descriptor; the
        # fd transport keeps the descriptor itself until revoke.  Cleared before closed: a
        # fork between the two must not leave the child a stale number.
        fd, owned.fd = owned.fd, -1
        if not transport.keeps_published:
            os.close(fd)

    def free(self, alloc: Allocation) -> None:
        owned: _Owned = alloc.state
        try:
            if alloc.exported:
                self.store.revoke(alloc.handle)
        finally:
            self.forget(alloc)
            owned.mapping.release()

    def forget(self, region: Region) -> None:
        """Drop the unexported segment's descriptor (cleared first, so this never closes one
        twice); in a forked child also give the mapping a fresh lock (another thread of the
        parent may have held it at fork time)."""
        owned = region.state
        mapping = owned.mapping if isinstance(owned, _Owned) else owned
        if isinstance(mapping, Mapping) and os.getpid() != self._pid:
            mapping._lock = threading.Lock()
        if isinstance(owned, _Owned):
            fd, owned.fd = owned.fd, -1
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:  # closed already (EBADF): nothing left to drop
                    pass

    def open(self, handle: IpcMemHandle, ticket: bytes | None = None) -> ImportedMemory:
        mapping = self._open_segment(handle, ticket)
        return ImportedMemory(mapping.addr, handle.size, handle.device, handle, mapping)

    def close(self, mem: ImportedMemory) -> None:
        mem.state.release()

    def asarray(
        self, region: Region, offset: int, shape: tuple[int, ...], dtype: Any
    ) -> NDArray[Any]:
        dtype = np.dtype(dtype)
        # math.prod, not numpy's: the first numpy reduction in a process costs ~100 us.
        nbytes = math.prod(shape) * dtype.itemsize
        # The array's base is the view, which pins the mapping; every array derived from it
        # keeps it too.
        mapping = _mapping_of(region)
        if not isinstance(mapping, Mapping):
            # Registered host memory (hipipc.hostmem): its pins hand out buffers of their own.
            own = np.frombuffer(mapping.buffer(offset, nbytes), dtype=dtype, count=math.prod(shape))
            return own.reshape(shape)
        if dtype.isbuiltin == 1:  # a native-order number or bool: its typestr says it all
            arr: NDArray[Any] = np.asarray(mapping.view(offset, nbytes, dtype.str, shape))
            return arr
        flat: NDArray[Any] = np.asarray(mapping.view(offset, nbytes))
        typed: NDArray[Any] = flat.view(dtype)
        return typed.reshape(shape)

    def pin(self, region: Region, offset: int, nbytes: int) -> Any:
        # A bare pin, not a ctypes buffer: ctypes caches one array type per length forever.
        return _mapping_of(region).pin(offset, nbytes)

    # -- streams and events --------------------------------------------------------------

    def create_stream(self, device: int, blocking: bool) -> HostStream:
        return HostStream(device, blocking, self._null_stream)

    def null_stream(self) -> NullStream:
        return self._null_stream

    def create_event(self, flags: int, device: int) -> HostEvent:
        if not flags & hipEventInterprocess:
            return HostEvent(flags, device, EventState.private())
        handle, fd, mapping = self._new_segment(
            IpcEventHandle, HandleKind.HOST_EVENT, STATE_SIZE, device
        )
        try:
            # The state locks through its own descriptor (eventstate's module doc); ours is
            # closed once export has linked the segment in.
            try:
                # At the fd limit: raised toward the hard limit, else hipErrorOutOfMemory
                # naming it (each interprocess event keeps this descriptor).  An fd-transport
                # event's exported descriptor is shared with its importers (pidfd_getfd): the
                # lock needs a description of its own.
                lock_fd = (
                    _os_call("keeping an interprocess event's segment open", os.dup, fd)
                    if handle.fd_route is None
                    else own_description(fd)
                )
            except HipError:
                mapping.release()
                raise
            except OSError as exc:
                mapping.release()
                raise HipError(
                    hipError_t.hipErrorOperatingSystem,
                    f"cannot keep the event's segment open: {exc.strerror}",
                ) from exc
            state = _mapped_state(mapping, lock_fd)
        except BaseException:
            os.close(fd)
            raise
        return HostEvent(flags, device, state, handle, store=self.store.route(handle), fd=fd)

    def open_event(self, handle: IpcEventHandle, ticket: bytes | None = None) -> HostEvent:
        if handle.size != STATE_SIZE:
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"the event handle names {handle.size} bytes of state, this hipipc "
                f"uses {STATE_SIZE}: exporter and importer run different versions",
            )
        fd, mapping = self._open_and_map(handle, ticket)
        if handle.fd_route is not None:  # shares the exporter's description: lock on our own
            try:
                fd, taken = own_description(fd), fd
            except BaseException:
                os.close(fd)
                mapping.release()
                raise
            os.close(taken)
        state = _mapped_state(mapping, fd)  # keeps the descriptor: the event's lock
        # An opened IPC event has the flags its creator had to use.
        return HostEvent(hipEventInterprocess | hipEventDisableTiming, handle.device, state, handle)


def _mapping_of(region: Region) -> Mapping:
    return region.state.mapping if isinstance(region.state, _Owned) else region.state


def _mapped_state(mapping: Mapping, fd: int) -> EventState:
    """The event state in a segment's payload; it owns the mapping and ``fd`` from now on."""
    try:
        pin = mapping.buffer(0, STATE_SIZE)
        return EventState(mapping.addr, pin, fd)
    except BaseException:
        os.close(fd)
        raise
    finally:
        mapping.release()  # unmapped when the state (its pin) is gone
