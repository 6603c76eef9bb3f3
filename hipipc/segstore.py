"""The seam between the backends and the ways a segment is shared (transports).

A *segment* is a header page (:mod:`hipipc.segment`) and a payload (memory or event state).
A :class:`Transport` creates it with a fresh handle, makes it openable (``publish``), opens it
in another process from the handle alone, and revokes it.  Two implement it:

* :class:`hipipc.store.HandleStore` (``"store"``): a name in a private directory on /dev/shm;
* :class:`hipipc.fdtransport.FdTransport` (``"fd"``): a sealed memfd that no file system
  names, taken from the exporter with ``pidfd_getfd`` (or its SCM_RIGHTS server).

:class:`Transports` is the per-handle choice the backends hold (``backend.store``): a new
segment goes to the process's transport (``$HIPIPC_TRANSPORT``, read once) or a per-allocation
override; everything else goes where the handle says (:attr:`IpcHandle.transport`), so an
importer needs no setting.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import HipError, hipError_t
from .handle import HandleKind, IpcHandle

if TYPE_CHECKING:
    from .fdtransport import FdTransport
    from .store import HandleStore, SegmentInfo

__all__ = ["Transport", "Transports"]

_H = TypeVar("_H", bound=IpcHandle)


class Transport(abc.ABC):
    """One way of sharing segments.  Every method raises ``HipError`` with HIP's code."""

    name: ClassVar[str]
    # Whether publish keeps the segment's descriptor (the transport owns it until revoke) or
    # the caller closes it after publish (a name keeps the file alive instead).
    keeps_published: ClassVar[bool]
    # Set by the exit rule before it revokes: publishing and tickets are refused from then on.
    exiting: bool

    def _refuse_if_exiting(self) -> None:
        """``hipErrorDeinitialized`` once the exit rule has started (:attr:`exiting`)."""
        if self.exiting:
            raise HipError(
                hipError_t.hipErrorDeinitialized,
                "the process is exiting: its exports were revoked (the exit rule), "
                "nothing new can be exported",
            )

    @abc.abstractmethod
    def new_segment(
        self, handle_type: type[_H], kind: HandleKind, size: int, device: int
    ) -> tuple[_H, int]:
        """A fresh handle of ``handle_type`` and its unexported segment (a header page, then
        ``size`` bytes reserved: a full memory fails here with ``hipErrorOutOfMemory``), as
        (handle, descriptor).  The caller owns the descriptor; the handle never changes."""

    @abc.abstractmethod
    def publish(self, fd: int, handle: IpcHandle, mode: int) -> None:
        """Make the segment behind ``fd`` openable under ``handle`` for the processes that
        ``mode`` (:func:`hipipc.store.share_mode`) admits: the explicit export step.  On
        success, :attr:`keeps_published` says who owns ``fd`` now; on error, the caller."""

    @abc.abstractmethod
    def revoke(self, handle: IpcHandle) -> None:
        """Later opens of ``handle`` fail; mappings made already stay valid.  Idempotent."""

    @abc.abstractmethod
    def open(self, handle: IpcHandle, ticket: bytes | None = None) -> int:
        """A new descriptor (``O_RDWR``, close-on-exec) of the segment ``handle`` names, its
        identity checked in constant time; through the one-time ``ticket`` of a pickle if
        given.  ``hipErrorInvalidResourceHandle`` with the reason when it cannot be opened."""

    @abc.abstractmethod
    def issue_ticket(self, handle: IpcHandle) -> tuple[bytes, str]:
        """A one-time ticket that keeps the exported segment openable after ``revoke`` until
        a receiver opens through it: (secret, ticket name)."""

    @abc.abstractmethod
    def consume_ticket(self, handle: IpcHandle, ticket: bytes) -> None:
        """Use up ``ticket`` without opening through it (the memory was open here already)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the ticket ``name`` issued here is still unconsumed."""

    @abc.abstractmethod
    def discard(self, name: str) -> bool:
        """Withdraw the ticket ``name`` issued here; True if it was there."""

    @abc.abstractmethod
    def remove_if_empty(self) -> None:
        """The last step of the exit rule, after every export and ticket was revoked."""

    @abc.abstractmethod
    def forget(self) -> None:
        """In a forked child: drop the parent's descriptors and locks; never raises."""


class Transports:
    """The transports of one process and the per-handle choice between them.

    What the backends and the registry call ``store``: ``new_segment`` takes the process's
    transport (:func:`hipipc.fdtransport.default_transport`) or ``transport=``; every other
    call goes to :meth:`route` of the handle; ticket names go to the transport that issued
    them.  The store's maintenance calls (``own_path``, ``diagnose``, ...) are its own.
    """

    def __init__(self, store: HandleStore) -> None:
        from .fdtransport import FdTransport  # imports this module (its base class)

        self.store = store
        # Made now, not on first use: two threads making one each would split the exports
        # between two tables.  Costs no syscall until used.
        self.fd: FdTransport = FdTransport()
        self._exiting = False

    def route(self, handle: IpcHandle) -> Transport:
        """The transport ``handle`` was made by (its tail says)."""
        return self.store if handle._route is None else self.fd

    def choose(self, transport: str | None = None) -> Transport:
        """The transport for a new segment: ``transport`` (``"store"``, ``"fd"`` or
        ``"auto"``) or the process's choice.  ``hipErrorInvalidValue`` for another name,
        ``hipErrorNotSupported`` for ``"fd"`` on a kernel without it."""
        from .fdtransport import default_transport, resolve_transport

        name = default_transport() if transport is None else resolve_transport(transport)
        return self.fd if name == "fd" else self.store

    def new_segment(
        self,
        handle_type: type[_H],
        kind: HandleKind,
        size: int,
        device: int,
        *,
        transport: str | None = None,
    ) -> tuple[_H, int]:
        return self.choose(transport).new_segment(handle_type, kind, size, device)

    # -- routed by handle ------------------------------------------------------------------

    def revoke(self, handle: IpcHandle) -> None:
        self.route(handle).revoke(handle)

    def open(self, handle: IpcHandle, ticket: bytes | None = None) -> int:
        if handle._route is None:  # the store's open path, one attribute test away
            return self.store.open(handle, ticket)
        return self.fd.open(handle, ticket)

    def issue_ticket(self, handle: IpcHandle) -> tuple[bytes, str]:
        return self.route(handle).issue_ticket(handle)

    def consume_ticket(self, handle: IpcHandle, ticket: bytes) -> None:
        self.route(handle).consume_ticket(handle, ticket)

    # -- ticket names (the registry's exit rule) ---------------------------------------------

    def exists(self, name: str) -> bool:
        if self.fd.issued(name):
            return self.fd.exists(name)
        return self.store.exists(name)

    def discard(self, name: str) -> bool:
        if self.fd.issued(name):
            return self.fd.discard(name)
        return self.store.discard(name)

    # -- process lifetime ------------------------------------------------------------------

    @property
    def exiting(self) -> bool:
        return self._exiting

    @exiting.setter
    def exiting(self, value: bool) -> None:
        self._exiting = value
        self.store.exiting = value
        self.fd.exiting = value

    @property
    def _lock(self) -> Any:
        """The store's lock (the registry holds it across fork)."""
        return self.store._lock

    def remove_if_empty(self) -> None:
        try:
            self.fd.remove_if_empty()
        finally:
            self.store.remove_if_empty()

    def forget(self) -> None:
        try:
            self.fd.forget()
        finally:
            self.store.forget()

    # -- the store's own maintenance (hipipc info, tests) ------------------------------------

    @property
    def template(self) -> str:
        return self.store.template

    def own_path(self) -> str:
        return self.store.own_path()

    def path_for(self, uid: int) -> str:
        return self.store.path_for(uid)

    def diagnose(self) -> str | None:
        return self.store.diagnose()

    def entries(self) -> Iterator[tuple[str, SegmentInfo | None, os.stat_result]]:
        return self.store.entries()

    def collect(
        self, skipped: list[tuple[str, str]] | None = None, *, dry_run: bool = False
    ) -> list[str]:
        return self.store.collect(skipped, dry_run=dry_run)

    def close(self) -> None:
        self.store.close()
