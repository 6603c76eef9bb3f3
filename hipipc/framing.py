"""Reading and writing one handle frame on a socket or ``multiprocessing`` Connection, with a
deadline that bounds the whole call.

Why not ``Connection.recv_bytes``/``poll``: ``poll(t)`` only waits for the first byte; a peer
that sends a length header and part of a frame then blocks ``recv_bytes`` forever.  And after
a frame longer than ``maxlength`` it raises ``OSError`` with the body still unread, so every
later receive parses body bytes as a header.  Here the descriptor is read directly (``poll``
in short slices, then only the bytes the current frame still needs), multiprocessing's
length-prefixed format (``!i`` length, or ``-1`` and a ``!Q`` length) is parsed with a size
limit, and what a call has read of a frame is kept per channel: a timeout mid-frame resumes
where it stopped on the next call, an oversized frame is reported once and its body skipped,
so the channel stays in step.  Sockets carry bare 64-byte frames, kept per socket the same way.

Errors: ``TimeoutError`` when the deadline passes, ``EOFError`` when the peer closed between
frames (or has gone, on a send), ``HipError(hipErrorInvalidValue)`` for a malformed frame or a
closed/unusable channel, ``HipError(hipErrorOperatingSystem)`` for any other OS failure.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import weakref
from typing import Any

from .errors import HipError, hipError_t
from .timeouts import remaining

__all__: list[str] = []  # internal

_SLICE = 0.5  # poll in slices: signals (Ctrl-C) are handled, and poll's int ms never overflows
_SKIP_CHUNK = 1 << 20
_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


class _Partial:
    """What has been read of the current frame, and how much of a refused one to skip."""

    __slots__ = ("data", "skip", "lock", "__weakref__")

    def __init__(self) -> None:
        self.data = bytearray()
        self.skip = 0
        self.lock = threading.Lock()


_partials: weakref.WeakKeyDictionary[Any, _Partial] = weakref.WeakKeyDictionary()
_partials_lock = threading.Lock()


def _partial(channel: Any) -> _Partial:
    with _partials_lock:
        state = _partials.get(channel)
        if state is None:
            state = _partials[channel] = _Partial()
        return state


def _fd(channel: Any, readable: bool) -> int:
    """The channel's descriptor; ``hipErrorInvalidValue`` if it is closed or one-way."""
    try:
        fd = channel.fileno()
    except (OSError, ValueError):  # Connection: "handle is closed"
        fd = -1
    if not isinstance(fd, int) or fd < 0:
        raise _invalid(f"the {type(channel).__name__} is closed")
    side = "readable" if readable else "writable"
    if getattr(channel, side, True) is False:
        raise _invalid(f"the Connection is not {side} (the other end of a one-way Pipe?)")
    return fd


def _ready(fd: int, events: int, end: float | None) -> bool:
    """Wait until ``fd`` has ``events`` (or an error/hangup to report), False at ``end``."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = remaining(end)
        wait = _SLICE if left is None else min(_SLICE, left)
        try:
            if poller.poll(int(wait * 1000) + (wait > 0)):  # round up: never spin at 0 ms
                return True
        except InterruptedError:
            pass
        if end is not None and remaining(end) == 0:
            return False


def _os_error(exc: OSError, what: str) -> BaseException:
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or exc.errno == errno.EPIPE:
        return EOFError(f"the peer closed the channel ({what}: {exc.strerror})")
    if exc.errno == errno.EBADF:
        return _invalid(f"the channel was closed ({what})")
    return HipError(hipError_t.hipErrorOperatingSystem, f"{what} failed: {exc}")


def _read_some(channel: Any, fd: int, n: int) -> bytes | None:
    """Up to ``n`` bytes now; None if nothing could be read after all (spurious wakeup)."""
    try:
        if isinstance(channel, socket.socket):
            return channel.recv(n)
        return os.read(fd, n)
    except (TimeoutError, BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise _os_error(exc, "receive") from None


def _need(state: _Partial, limit: int, framed: bool) -> tuple[int, int]:
    """(bytes the frame still needs, its header size) or raise for a refused frame.

    ``framed``: multiprocessing's length prefix; else bare ``limit``-byte frames.
    """
    data = state.data
    if not framed:
        return limit - len(data), 0
    if len(data) < _LEN.size:
        return _LEN.size - len(data), 0
    (size,) = _LEN.unpack_from(data)
    header = _LEN.size
    if size == -1:  # a frame over 2 GiB: a 64-bit length follows
        header += _LEN64.size
        if len(data) < header:
            return header - len(data), 0
        (size,) = _LEN64.unpack_from(data, _LEN.size)
    elif size < 0:
        data.clear()
        raise _invalid(
            f"corrupt frame header (length {size}): the peer does not speak "
            "multiprocessing's framing; the channel is out of step, close it"
        )
    if size > limit:
        state.skip = size - (len(data) - header)
        data.clear()
        raise _invalid(
            f"the message is {size} bytes, not a {limit}-byte handle; it is "
            "skipped and the next receive reads the message after it"
        )
    return header + size - len(data), header


def read_frame(channel: Any, limit: int, end: float | None, *, framed: bool) -> bytes:
    """The body of the next frame of at most ``limit`` bytes on ``channel`` by ``end``."""
    fd = _fd(channel, readable=True)
    state = _partial(channel)
    if not state.lock.acquire(timeout=remaining(end) if end is not None else -1):
        raise TimeoutError("another thread is receiving on this channel")
    try:
        while True:
            if state.skip:
                n = min(state.skip, _SKIP_CHUNK)
            else:
                n, header = _need(state, limit, framed)
                if n == 0:
                    body = bytes(state.data[header:])
                    state.data.clear()
                    return body
            if not _ready(fd, select.POLLIN, end):
                got = len(state.data)
                raise TimeoutError(
                    f"no complete handle arrived in time ({got} bytes of a frame so far; "
                    "the next receive continues it)"
                    if got or state.skip
                    else "no handle arrived in time"
                )
            chunk = _read_some(channel, fd, n)
            if chunk is None:
                continue
            if not chunk:
                midway = len(state.data)
                state.data.clear()
                state.skip = 0
                if midway:
                    raise _invalid(f"the peer closed the channel {midway} bytes into a frame")
                raise EOFError("the peer closed the channel")
            if state.skip:
                state.skip -= len(chunk)
            else:
                state.data += chunk
    finally:
        state.lock.release()


def write_frame(channel: Any, payload: bytes, end: float | None) -> None:
    """Send ``payload`` as one frame (Connection: ``send_bytes``; socket: raw) by ``end``."""
    fd = _fd(channel, readable=False)
    if not _ready(fd, select.POLLOUT, end):
        raise TimeoutError("the channel stayed full: the peer is not receiving")
    try:
        if not isinstance(channel, socket.socket):
            # The pipe has room (POLLOUT: at least a page), so this small write does not block.
            channel.send_bytes(payload)
            return
        view = memoryview(payload)
        while view:
            try:
                view = view[channel.send(view) :]
            except (TimeoutError, BlockingIOError, InterruptedError):
                pass
            if view and not _ready(fd, select.POLLOUT, end):
                raise TimeoutError(
                    f"{len(payload) - len(view)} of {len(payload)} bytes sent "
                    "in time; the stream is out of step, close it"
                )
    except TimeoutError:
        raise
    except OSError as exc:
        raise _os_error(exc, "send") from None
