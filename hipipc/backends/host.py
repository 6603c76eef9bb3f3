"""The host backend: "device" memory is a POSIX shared-memory segment on /dev/shm.

Pointers are the real virtual addresses of shared file mappings, so numpy, ctypes and DLPack
consumers can use them directly.  ``HIPIPC_HOST_DEVICES`` (default 1) sets how many logical
devices exist; a device ordinal is only a label recorded in the handle.  Streams and events
live in :mod:`.host_streams`; an interprocess event's state is one page of a store segment,
exported, opened, revoked and collected exactly like memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HipError, hipError_t
from ..events import hipEventDisableTiming, hipEventInterprocess
from ..handle import HandleKind, IpcEventHandle, IpcHandle, IpcMemHandle
from ..mapping import Mapping, map_file
from ..store import PAGE_SIZE, HandleStore
from .base import Allocation, Backend, ImportedMemory, Region
from .eventstate import STATE_SIZE, EventState
from .host_streams import HostEvent, HostStream, NullStream

__all__ = ["HostBackend"]

DEVICES_ENV = "HIPIPC_HOST_DEVICES"
_HOST_KINDS = (HandleKind.HOST_MEMORY, HandleKind.HOST_EVENT)


def _mapped_length(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


@dataclass(eq=False)
class _Owned:
    mapping: Mapping
    fd: int  # the unnamed segment's descriptor, needed until it is linked; then -1


class HostBackend(Backend):
    """Memory in store segments, mapped shared; copies are ``memmove`` (GIL released)."""

    name = "host"
    memory_kind = HandleKind.HOST_MEMORY

    def __init__(self, store: HandleStore) -> None:
        super().__init__(store)
        self._null_stream = NullStream()

    def device_count(self) -> int:
        raw = os.environ.get(DEVICES_ENV, "1")
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1:
            raise HipError(hipError_t.hipErrorNoDevice,
                           f"${DEVICES_ENV}={raw!r} must be a positive integer")
        return count

    def _new_segment(self, handle: IpcHandle) -> tuple[int, Mapping]:
        """An unnamed segment for ``handle``, mapped: (its descriptor, the mapping)."""
        fd = self.store.create(handle, handle.size)
        try:
            return fd, map_file(fd, _mapped_length(handle.size), PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise

    def _open_segment(self, handle: IpcHandle, ticket: bytes | None = None) -> Mapping:
        """Map the segment another process exported under ``handle`` (through ``ticket``)."""
        fd = self.store.open(handle, ticket)  # first: a handle that names nothing says so
        try:
            if handle.kind not in _HOST_KINDS:
                raise HipError(hipError_t.hipErrorNotSupported,
                               f"the handle names {handle.kind.name} but this process runs "
                               "the host backend (set HIPIPC_BACKEND to match the exporter)")
            return map_file(fd, _mapped_length(handle.size), PAGE_SIZE)
        finally:
            os.close(fd)

    def allocate(self, nbytes: int, device: int) -> Allocation:
        handle = IpcMemHandle.new(HandleKind.HOST_MEMORY, nbytes, device, os.geteuid())
        fd, mapping = self._new_segment(handle)
        return Allocation(mapping.addr, nbytes, device, handle, _Owned(mapping, fd))

    def export(self, alloc: Allocation, mode: int) -> None:
        owned: _Owned = alloc.state
        self.store.publish(owned.fd, alloc.handle, mode)
        # The name now keeps the file alive and the mapping needs no descriptor.
        os.close(owned.fd)
        owned.fd = -1

    def free(self, alloc: Allocation) -> None:
        owned: _Owned = alloc.state
        try:
            if alloc.exported:
                self.store.revoke(alloc.handle)
        finally:
            self.forget(alloc)
            owned.mapping.release()

    def forget(self, region: Region) -> None:
        owned = region.state
        if isinstance(owned, _Owned) and owned.fd >= 0:
            os.close(owned.fd)
            owned.fd = -1

    def open(self, handle: IpcMemHandle, ticket: bytes | None = None) -> ImportedMemory:
        mapping = self._open_segment(handle, ticket)
        return ImportedMemory(mapping.addr, handle.size, handle.device, handle, mapping)

    def close(self, mem: ImportedMemory) -> None:
        mem.state.release()

    def asarray(self, region: Region, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        buf = self.pin(region, offset, count * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def pin(self, region: Region, offset: int, nbytes: int) -> Any:
        mapping: Mapping = region.state.mapping if isinstance(region.state, _Owned) \
            else region.state
        return mapping.buffer(offset, nbytes)

    # -- streams and events --------------------------------------------------------------

    def create_stream(self, device: int, blocking: bool) -> HostStream:
        return HostStream(device, blocking)

    def null_stream(self) -> NullStream:
        return self._null_stream

    def create_event(self, flags: int, device: int) -> HostEvent:
        if not flags & hipEventInterprocess:
            return HostEvent(flags, device, EventState.private())
        handle = IpcEventHandle.new(HandleKind.HOST_EVENT, STATE_SIZE, device, os.geteuid())
        fd, mapping = self._new_segment(handle)
        try:
            state = _mapped_state(mapping, initialize=True)
        except BaseException:
            os.close(fd)
            raise
        return HostEvent(flags, device, state, handle, store=self.store, fd=fd)

    def open_event(self, handle: IpcEventHandle, ticket: bytes | None = None) -> HostEvent:
        if handle.size != STATE_SIZE:
            raise HipError(hipError_t.hipErrorInvalidResourceHandle,
                           f"the event handle names {handle.size} bytes of state, this hipipc "
                           f"uses {STATE_SIZE}: exporter and importer run different versions")
        state = _mapped_state(self._open_segment(handle, ticket), initialize=False)
        # An opened IPC event has the flags its creator had to use.
        return HostEvent(hipEventInterprocess | hipEventDisableTiming, handle.device, state,
                         handle)


def _mapped_state(mapping: Mapping, *, initialize: bool) -> EventState:
    """The event state in a segment's payload; it owns the mapping from now on."""
    try:
        pin = mapping.buffer(0, STATE_SIZE)
        return EventState(mapping.addr, pin, initialize=initialize)
    finally:
        mapping.release()  # unmapped when the state (its pin) is gone
