"""The interface every memory backend implements; nothing above ``backends/`` sees more.

A backend owns the memory itself (allocating, exporting, opening, copying, viewing).  The
per-process bookkeeping (which pointers exist, refcounts, same-process checks) lives in
:mod:`hipipc.registry`, the secure naming in :mod:`hipipc.store`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from numpy.typing import NDArray

from ..devtypes import hipDeviceProp_t
from ..errors import HipError, hipError_t
from ..events import Event
from ..handle import HandleKind, IpcEventHandle, IpcMemHandle
from ..mapping import Mapping
from ..segstore import Transports
from ..streams import Stream

__all__ = ["Backend", "Allocation", "ImportedMemory", "Region"]


@dataclass(eq=False)
class Region:
    """A range of device memory this process can address."""

    ptr: int
    size: int
    device: int
    handle: IpcMemHandle
    state: Any = field(default=None, repr=False)  # backend-private


@dataclass(eq=False)
class Allocation(Region):
    """Memory this process allocated (``hipMalloc``); ``exported`` once it has a name."""

    exported: bool = False


@dataclass(eq=False)
class ImportedMemory(Region):
    """Memory another process exported and this one opened; ``refs`` counts the opens."""

    refs: int = 1


class Backend(abc.ABC):
    """The memory operations of one kind of device.

    Methods raise :class:`~hipipc.errors.HipError` with HIP's code; none returns a status.
    Pointers are plain ints; the registry has already checked that they lie inside a region.
    """

    name: ClassVar[str]
    memory_kind: ClassVar[HandleKind]

    def __init__(self, store: Transports) -> None:
        self.store = store  # the per-handle choice of transport (hipipc.segstore)

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of devices; ordinals run from 0."""

    @abc.abstractmethod
    def allocate(self, nbytes: int, device: int, transport: str | None = None) -> Allocation:
        """Allocate ``nbytes`` (> 0) on ``device`` with a fresh handle; nothing is exported.
        ``transport`` (``store``, ``fd``, ``auto``) overrides the process's choice."""

    @abc.abstractmethod
    def export(self, alloc: Allocation, mode: int) -> None:
        """Make ``alloc`` openable under its handle (its transport's publish) for ``mode``."""

    @abc.abstractmethod
    def free(self, alloc: Allocation) -> None:
        """Revoke the export (if any) and release the memory; importers keep their mapping."""

    @abc.abstractmethod
    def open(self, handle: IpcMemHandle, ticket: bytes | None = None) -> ImportedMemory:
        """Map the memory another process exported under ``handle``; through the one-time
        ``ticket`` of a pickle if given (:meth:`HandleStore.open`)."""

    @abc.abstractmethod
    def close(self, mem: ImportedMemory) -> None:
        """Unmap an import whose last reference was closed."""

    @abc.abstractmethod
    def asarray(
        self, region: Region, offset: int, shape: tuple[int, ...], dtype: Any
    ) -> NDArray[Any]:
        """A zero-copy array over ``region`` from ``offset`` that keeps the memory alive."""

    @abc.abstractmethod
    def pin(self, region: Region, offset: int, nbytes: int) -> Any:
        """An object that keeps ``nbytes`` of ``region`` at ``offset`` usable while it lives,
        even if the region is freed or closed meanwhile (held by enqueued operations)."""

    # -- streams and events --------------------------------------------------------------

    @abc.abstractmethod
    def create_stream(self, device: int, blocking: bool) -> Stream:
        """A new stream on ``device``; ``blocking`` False for ``hipStreamNonBlocking``."""

    @abc.abstractmethod
    def null_stream(self) -> Stream:
        """The null stream: CUDA's legacy default stream, asynchronous to the host; its
        :meth:`~hipipc.streams.Stream.synchronous` view serves ``hipMemcpy``/``hipMemset``."""

    @abc.abstractmethod
    def create_event(self, flags: int, device: int) -> Event:
        """A new event; ``flags`` are valid (:func:`hipipc.events.check_event_flags`)."""

    @abc.abstractmethod
    def open_event(self, handle: IpcEventHandle, ticket: bytes | None = None) -> Event:
        """Open the interprocess event another process exported under ``handle`` (through
        ``ticket`` if given)."""

    def forget(self, region: Region) -> None:  # noqa: B027 - optional hook
        """Drop per-process resources of ``region`` in a forked child without freeing it."""

    # -- device and host-memory queries (hipipc.device, hipipc.hostmem) -------------------
    # Not abstract: a backend that lacks one says so with hipErrorNotSupported.  A GPU backend
    # maps each to the runtime call named in its docstring.

    def device_properties(self, device: int) -> hipDeviceProp_t:
        """``hipGetDeviceProperties(device)`` (``device`` already range-checked)."""
        raise _unsupported("hipGetDeviceProperties")

    def mem_info(self, device: int) -> tuple[int, int]:
        """``hipMemGetInfo``: (free, total) bytes that ``hipMalloc`` on ``device`` can use."""
        raise _unsupported("hipMemGetInfo")

    def can_access_peer(self, device: int, peer: int) -> bool:
        """``hipDeviceCanAccessPeer`` for two distinct, range-checked devices."""
        raise _unsupported("hipDeviceCanAccessPeer")

    def host_alloc(self, nbytes: int, flags: int) -> tuple[Mapping, bool]:
        """``hipHostMalloc``: ``nbytes`` (> 0) of host memory, page aligned, and whether it
        is locked in RAM (see the backend for what "pinned" means there)."""
        raise _unsupported("hipHostMalloc")

    def host_lock(self, addr: int, nbytes: int) -> bool:
        """Pin ``[addr, addr+nbytes)`` for ``hipHostRegister``; False if it stays pageable."""
        raise _unsupported("hipHostRegister")

    def host_unlock(self, addr: int, nbytes: int) -> None:
        """Undo :meth:`host_lock` (``hipHostUnregister``, ``hipHostFree``)."""
        raise _unsupported("hipHostUnregister")


def _unsupported(call: str) -> HipError:
    return HipError(hipError_t.hipErrorNotSupported, f"{call} is not implemented by this backend")
