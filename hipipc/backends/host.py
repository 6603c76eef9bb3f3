"""The host backend: "device" memory is a POSIX shared-memory segment on /dev/shm.

Pointers are the real virtual addresses of shared file mappings, so numpy, ctypes and DLPack
consumers can use them directly.  ``HIPIPC_HOST_DEVICES`` (default 1) sets how many logical
devices exist; a device ordinal is only a label recorded in the handle.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HipError, hipError_t
from ..handle import HandleKind, IpcMemHandle
from ..mapping import Mapping, map_file
from ..store import PAGE_SIZE
from .base import Allocation, Backend, ImportedMemory, Region

__all__ = ["HostBackend"]

DEVICES_ENV = "HIPIPC_HOST_DEVICES"


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

    def allocate(self, nbytes: int, device: int) -> Allocation:
        handle = IpcMemHandle.new(HandleKind.HOST_MEMORY, nbytes, device, os.geteuid())
        fd = self.store.create(handle, nbytes)
        try:
            mapping = map_file(fd, _mapped_length(nbytes), PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise
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

    def open(self, handle: IpcMemHandle) -> ImportedMemory:
        if handle.kind != HandleKind.HOST_MEMORY:
            raise HipError(hipError_t.hipErrorNotSupported,
                           f"the handle names {handle.kind.name} memory but this process runs "
                           "the host backend (set HIPIPC_BACKEND to match the exporter)")
        fd = self.store.open(handle)
        try:
            mapping = map_file(fd, _mapped_length(handle.size), PAGE_SIZE)
        finally:
            os.close(fd)
        return ImportedMemory(mapping.addr, handle.size, handle.device, handle, mapping)

    def close(self, mem: ImportedMemory) -> None:
        mem.state.release()

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        ctypes.memset(ptr, value, nbytes)

    def asarray(self, region: Region, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
        mapping: Mapping = region.state.mapping if isinstance(region.state, _Owned) \
            else region.state
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        buf = mapping.buffer(offset, count * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
