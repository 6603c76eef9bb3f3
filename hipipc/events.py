"""Events (``hipEvent_t``) and their flags: the interface every backend's events implement.

CUDA/HIP rules kept here and by every backend:

- An event that was never recorded is complete.
- ``hipEventRecord`` captures the work enqueued on the stream *so far*; recording again
  replaces what the event stands for.  ``hipEventSynchronize`` and ``hipStreamWaitEvent``
  wait for the newest record *as of the call*, not for records made later.
- An interprocess event needs ``hipEventInterprocess | hipEventDisableTiming``: HIP refuses
  ``hipEventInterprocess`` alone at creation (``hipErrorInvalidValue``).  Any process that
  opened its handle may record it, query it, synchronize on it and make streams wait on it.
- ``hipEventElapsedTime`` needs two completed events created with timing.

Events travel (as torch and cuda.core send them through queues): pickling an interprocess
event sends its IPC handle, plus a one-time ticket when the creator sends it, so that the
creator may drop its event right after sending (the send-and-drop protocol of
:mod:`hipipc.buffer`); the receiver gets the event opened (``hipIpcOpenEventHandle``), and
the creating process gets its own event back.  A local event cannot be pickled: its records
complete in private memory (``TypeError`` saying to create it with ``hipEventInterprocess``).

Backends subclass :class:`Event`; nothing above ``backends/`` needs to know which one runs.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from .errors import HipError, hipError_t
from .handle import IpcEventHandle

if TYPE_CHECKING:
    from .streams import Stream

__all__ = [
    "Event",
    "hipEvent_t",
    "hipEventDefault",
    "hipEventBlockingSync",
    "hipEventDisableTiming",
    "hipEventInterprocess",
]

hipEventDefault = 0x0
hipEventBlockingSync = 0x1
hipEventDisableTiming = 0x2
hipEventInterprocess = 0x4
_KNOWN_FLAGS = hipEventBlockingSync | hipEventDisableTiming | hipEventInterprocess


def check_event_flags(flags: Any) -> int:
    """Validate ``hipEventCreateWithFlags`` flags; ``hipErrorInvalidValue`` if they are wrong."""
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"event flags must be an int, not {type(flags).__name__}",
        )
    if flags & ~_KNOWN_FLAGS or flags < 0:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"unknown event flags {flags:#x} (known: hipEventBlockingSync, "
            "hipEventDisableTiming, hipEventInterprocess)",
        )
    if flags & hipEventInterprocess and not flags & hipEventDisableTiming:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            "hipEventInterprocess needs hipEventDisableTiming too (HIP and CUDA "
            "refuse interprocess events with timing)",
        )
    return flags


def destroyed_event() -> HipError:
    return HipError(
        hipError_t.hipErrorInvalidResourceHandle,
        "the event was destroyed (hipEventDestroy); create a new one",
    )


class Event(abc.ABC):
    """An event: a marker in a stream that other work (in any process, for IPC events) can
    wait for.  Made by ``hipEventCreate``/``hipEventCreateWithFlags`` or, from another
    process's handle, ``hipIpcOpenEventHandle``; released by ``hipEventDestroy``.

    Every method raises ``hipErrorInvalidResourceHandle`` once the event is destroyed.
    """

    flags: int
    device: int

    @property
    def interprocess(self) -> bool:
        return bool(self.flags & hipEventInterprocess)

    @property
    def timing(self) -> bool:
        return not self.flags & hipEventDisableTiming

    @property
    @abc.abstractmethod
    def destroyed(self) -> bool:
        """True after ``destroy``."""

    @property
    @abc.abstractmethod
    def handle(self) -> IpcEventHandle | None:
        """The event's IPC handle (interprocess events; exported or opened), else None."""

    @abc.abstractmethod
    def record(self, stream: Stream) -> None:
        """Capture the work enqueued on ``stream`` so far (``hipEventRecord``)."""

    @abc.abstractmethod
    def query(self) -> bool:
        """True when the newest record's work is done (or nothing was recorded)."""

    @abc.abstractmethod
    def synchronize(self, timeout: float | None) -> None:
        """Block until the newest record as of this call is done.

        Raises ``hipErrorNotReady`` after ``timeout`` seconds (None: no limit) and
        ``hipErrorLaunchFailure`` if the process that made the record exited before its work
        was done.
        """

    @abc.abstractmethod
    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event's completion to ``end``'s (``hipEventElapsedTime``)."""

    @abc.abstractmethod
    def export(self, mode: int) -> IpcEventHandle:
        """Publish an interprocess event under its handle (file ``mode``); same bytes each time."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Release the event; idempotent.  Work already enqueued still completes, and
        processes that opened the handle keep a usable event; new opens fail."""

    def forget(self) -> None:  # noqa: B027 - optional hook
        """In a forked child: drop per-process resources without touching the parent's."""

    def __reduce__(self) -> tuple[Any, tuple[bytes, bytes | None]]:
        """Pickle an interprocess event as its handle (+ a ticket from its creator)."""
        if self.handle is None:
            raise TypeError(
                "a local event cannot be sent to another process (its records complete in "
                "this process's private memory): create it with hipEventCreateWithFlags("
                "hipEventInterprocess | hipEventDisableTiming) and send that event or its "
                "hipIpcGetEventHandle"
            )
        if self.destroyed:
            raise destroyed_event()
        from .registry import get_registry  # registry imports this module

        reg = get_registry()
        ticket = None
        if reg.own_event(self.handle) is self:
            handle = self.export(0o600)  # the mode hipIpcGetEventHandle uses: user only
            ticket = reg.issue_ticket(handle)
        return (_rebuild_event, (bytes(self.handle), ticket))

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else "live"
        ipc = f" ipc id={self.handle.fingerprint}" if self.handle is not None else ""
        return f"<{type(self).__name__} flags={self.flags:#x} device={self.device} {state}{ipc}>"


hipEvent_t = Event


def _rebuild_event(raw: bytes, ticket: bytes | None) -> Event:
    """Unpickle an event: the creator's own event in its process, else open the handle."""
    from .registry import get_registry

    handle = IpcEventHandle.coerce(raw)
    reg = get_registry()
    own = reg.own_event(handle)
    if own is not None and not own.destroyed:
        if ticket is not None:
            reg.backend.store.consume_ticket(handle, ticket)
        return own
    return reg.open_event(handle, ticket)
