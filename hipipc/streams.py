"""Streams (``hipStream_t``): the interface every backend's streams implement.

CUDA/HIP rules kept by every backend:

- Work on one stream runs in the order it was enqueued, off the caller's thread; enqueueing
  never waits for earlier work.
- The null stream (``stream=None`` or ``0`` in every hip* call) is CUDA's and HIP's *legacy*
  default stream, asynchronous to the host as in CUDA: ``hipLaunchHostFunc``,
  ``hipMemcpyAsync``, ``hipMemsetAsync``, ``hipEventRecord`` and ``hipStreamWaitEvent`` on it
  enqueue and return at once.  Its ordering with the *blocking* streams (every stream not made
  with ``hipStreamNonBlocking``) holds both ways: a null-stream operation runs after the work
  enqueued before it on every blocking stream, and work enqueued on a blocking stream after a
  null-stream operation runs after that operation.  Non-blocking streams do neither.
- ``hipMemcpy`` and ``hipMemset`` stay synchronous, as ``cudaMemcpy`` is: they wait for the
  null stream's work (and through it for the blocking streams' earlier work), then copy in the
  caller before returning.  Code running on a stream's own thread (a host function) skips
  that wait, since it could wait for itself (CUDA forbids API calls there).
- A failure in enqueued work (an exception raised by a ``hipLaunchHostFunc`` function, a wait
  whose recorder died), on any stream including the null stream, is not raised by the call
  that enqueued it and not lost: the next synchronize of that stream, or of the device,
  raises ``HipError(hipErrorLaunchFailure)`` with the first such exception since the last
  report chained, once.  Work enqueued after the failure still runs, so events recorded later
  still complete and no peer process hangs on them.
- ``hipStreamDestroy`` returns at once; work already enqueued still runs, also when the
  process exits (exit waits up to 10 s for it).
- Stream work must not synchronize a stream or the device (it could wait for itself):
  ``hipErrorNotSupported``, as CUDA's ``cudaErrorNotPermitted``.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import HipError, hipError_t

if TYPE_CHECKING:
    from .events import Event

__all__ = ["Stream", "hipStream_t", "hipStreamDefault", "hipStreamNonBlocking"]

hipStreamDefault = 0x0
hipStreamNonBlocking = 0x1

_worker = threading.local()


def mark_stream_worker() -> None:
    """Called by a backend in each thread that runs stream work (host functions)."""
    _worker.active = True


def running_on_stream() -> bool:
    """True in a thread that runs stream work, where the null stream must not wait."""
    return getattr(_worker, "active", False)


def refuse_on_stream(call: str) -> None:
    """Synchronizing from stream work could wait for itself forever: CUDA refuses it
    (``cudaErrorNotPermitted``), and so does hipipc, with ``hipErrorNotSupported``."""
    if running_on_stream():
        raise HipError(
            hipError_t.hipErrorNotSupported,
            f"{call} from a host function running on a stream could wait for "
            "itself; record an event instead and synchronize outside stream work",
        )


def destroyed_stream() -> HipError:
    return HipError(
        hipError_t.hipErrorInvalidHandle,
        "the stream was destroyed (hipStreamDestroy); create a new one",
    )


def launch_failure(exc: BaseException, what: str) -> HipError:
    """The error a synchronize raises for work that failed; chain ``exc`` to it."""
    err = HipError(
        hipError_t.hipErrorLaunchFailure,
        f"{what} failed on the stream: {type(exc).__name__}: {exc}",
    )
    err.__cause__ = exc
    return err


class Stream(abc.ABC):
    """An ordered queue of work on one device (``hipStreamCreate``), or the null stream.

    The ``keep`` arguments are objects that must stay alive until the operation has run
    (host buffers, pins on device memory), so that freeing or dropping them early cannot
    make the operation touch unmapped memory.
    """

    device: int
    blocking: bool = True  # False for hipStreamNonBlocking: the null stream does not wait for it
    is_null: bool = False

    @property
    @abc.abstractmethod
    def destroyed(self) -> bool:
        """True after ``destroy``."""

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a stream belongs to the process that created it and cannot be sent: to order "
            "work across processes, send an interprocess event (hipEventCreateWithFlags("
            "hipEventInterprocess | hipEventDisableTiming)), record it here and call "
            "hipStreamWaitEvent on the receiver's stream"
        )

    @abc.abstractmethod
    def launch_host_func(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Enqueue ``fn(*args)`` (``hipLaunchHostFunc``)."""

    @abc.abstractmethod
    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, keep: tuple[Any, ...]) -> None:
        """Enqueue a copy of ``nbytes`` from address ``src`` to address ``dst``."""

    @abc.abstractmethod
    def memset(self, ptr: int, value: int, nbytes: int, keep: tuple[Any, ...]) -> None:
        """Enqueue filling ``nbytes`` at ``ptr`` with the byte ``value``."""

    @abc.abstractmethod
    def wait_event(self, event: Event) -> None:
        """Make later work wait for ``event``'s newest record as of now."""

    def synchronize(self, timeout: float | None) -> None:
        """Block until all work enqueued so far has run; report a failure (see module doc).

        Raises ``hipErrorNotReady`` after ``timeout`` seconds (None: no limit) and
        ``hipErrorInvalidHandle`` for a destroyed stream.
        """
        if self.destroyed:
            raise destroyed_stream()
        refuse_on_stream("hipStreamSynchronize")
        self.drain(timeout)

    def drain(self, timeout: float | None) -> None:
        """:meth:`synchronize` that also accepts a destroyed stream (``hipDeviceSynchronize``)."""
        self.wait_idle(timeout)
        self.report_failure()

    @abc.abstractmethod
    def report_failure(self) -> None:
        """Raise ``hipErrorLaunchFailure`` for the first failure not reported yet, once."""

    @abc.abstractmethod
    def wait_idle(self, timeout: float | None) -> None:
        """Wait for the work enqueued so far without reporting failures (the null stream's
        implicit wait); ``hipErrorNotReady`` after ``timeout`` seconds."""

    @property
    def finished(self) -> bool:
        """Destroyed, drained and nothing left to report: the registry may forget it."""
        return False

    @abc.abstractmethod
    def query(self) -> bool:
        """True when all work enqueued so far has run."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Stop accepting work; what is enqueued still runs.  Idempotent."""

    def forget(self) -> None:  # noqa: B027 - optional hook
        """In a forked child: the parent's stream has no worker here; make it refuse work."""

    def synchronous(self) -> Stream:
        """The null stream only: a view whose operations wait for the null stream's work (and
        the blocking streams' earlier work), then run in the caller (``hipMemcpy``)."""
        raise HipError(
            hipError_t.hipErrorNotSupported, "only the null stream has a synchronous view"
        )

    def __repr__(self) -> str:
        if self.is_null:
            return "<Stream null>"
        state = "destroyed" if self.destroyed else "live"
        return f"<{type(self).__name__} device={self.device} {state}>"


hipStream_t = Stream
