"""Passing handles between processes: a shared-memory mailbox, message queues, sockets, pipes.

A handle is 64 plain bytes, so any channel carries it; these helpers add the framing, the
timeouts and the validation (received bytes are untrusted and parsed as such).

- :class:`Mailbox`: a named POSIX shared-memory segment of handle slots plus a reusable,
  process-shared barrier, the pattern of CUDA's ``simpleIPC`` sample (a shared struct with
  ``cudaIpcMemHandle_t`` fields and a barrier).
- :func:`send_handle` / :func:`recv_handle`: one handle per message over a
  ``posix_ipc.MessageQueue`` (see :func:`create_handle_queue`), a stream socket (exact 64-byte
  framing) or a ``multiprocessing`` ``Connection``.

Timeouts raise the built-in :class:`TimeoutError` (``timeout=None`` or ``inf`` waits without
limit) and bound the whole call; every timeout is checked by :mod:`hipipc.timeouts` (nan,
negative or non-numbers: ``hipErrorInvalidValue``).  Malformed input raises
:class:`~hipipc.errors.HipError` with ``hipErrorInvalidValue``.

Names: POSIX names (``/dev/shm/<name>``, ``/dev/shm/sem.<name>``, message queues) are visible
to every user, so objects are created ``0600`` (only this uid can read the handle bytes, and a
process of this uid could read the exporter's memory anyway) and with ``O_EXCL`` (nobody can
pre-create a name to capture handles).  The creator unlinks every name it created; posix_ipc
has no resource tracker that would unlink them behind your back (unlike
``multiprocessing.shared_memory``, gh-82300).
"""

from __future__ import annotations

import mmap
import operator
import os
import secrets
import socket
import stat
import struct
import time
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

import posix_ipc

from .errors import HipError, hipError_t
from .framing import read_frame, write_frame
from .handle import HANDLE_SIZE, HandleKind, IpcEventHandle, IpcHandle, IpcMemHandle
from .hostbuf import refuse_objects
from .timeouts import deadline, remaining

__all__ = [
    "Mailbox",
    "create_handle_queue",
    "parse_handle",
    "send_handle",
    "recv_handle",
    "send_fds",
    "recv_fds",
]

_MB_MAGIC = b"hipipcMB"
_MB_VERSION = 1
# magic, version, slots, parties, barrier count, barrier generation
_MB_HEADER = struct.Struct("<8sIIIII")
_MB_HEADER_SIZE = 64
_COUNTERS_OFFSET = 20  # count, generation: two u32 written under the lock semaphore
_COUNTERS = struct.Struct("<II")
_SLOT_SIZE = 192  # memory handle, event handle, flags, padding to three cache lines
_SLOT_FLAGS = struct.Struct("<I")
_HAS_MEM, _HAS_EVENT = 1, 2
_MAX_SLOTS = 1 << 16
_LOCK_GRACE = 5.0  # seconds a timed-out waiter may wait for the lock to withdraw
_SLICE = 0.5  # block in slices so that signals (Ctrl-C) are handled while waiting
_EVENT_KINDS = (int(HandleKind.HOST_EVENT), int(HandleKind.GPU_EVENT))


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _deadline(timeout: Any) -> float | None:
    return deadline(timeout)  # the package's one timeout rule (hipipc.timeouts)


def _acquire(sem: posix_ipc.Semaphore, deadline: float | None) -> bool:
    """Acquire ``sem`` before ``deadline`` (None: no limit); False if the deadline passed."""
    while True:
        left = remaining(deadline)
        wait = _SLICE if left is None else min(_SLICE, left)
        try:
            sem.acquire(wait)
            return True
        except posix_ipc.BusyError:
            if deadline is not None and time.monotonic() >= deadline:
                return False


def _names(base: str) -> tuple[str, str, str]:
    return f"{base}-lock", f"{base}-gate0", f"{base}-gate1"


def _check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name.startswith("/")
        or "/" in name[1:]
        or not 1 < len(name) <= 200
    ):
        raise _invalid(
            f"a mailbox name is '/' followed by up to 199 characters without '/', got {name!r}"
        )
    return name


def _unlink_all(base: str, pid: int) -> None:
    """Remove a mailbox's names; a no-op in forked children (the creator owns the names)."""
    if os.getpid() != pid:
        return
    for unlink, name in (
        (posix_ipc.unlink_shared_memory, base),
        *((posix_ipc.unlink_semaphore, n) for n in _names(base)),
    ):
        try:
            unlink(name)
        except posix_ipc.ExistentialError:
            pass


class Mailbox:
    """A named shared-memory mailbox: ``slots`` handle slots and a barrier of ``parties``.

    Each slot holds one :class:`IpcMemHandle` and one :class:`IpcEventHandle` (either may be
    empty).  One process :meth:`create`\\ s the mailbox (under a fresh random name unless one is
    given) and others :meth:`attach` by name; the creator unlinks the names on :meth:`close`
    (or at exit, or when garbage collected).  Typical round, as in CUDA's ``simpleIPC``::

        box.put(rank, mem=handle)    # publish my handle
        box.wait(timeout=10)         # barrier: everybody has published
        peer, _ = box.get(other)     # read theirs

    :meth:`wait` is a reusable barrier across processes built from three POSIX semaphores
    (a lock and two alternating gates, so a fast party cannot take a slow one's pass).  On
    timeout it raises :class:`TimeoutError` and withdraws the caller, so the barrier stays
    usable; if the last party arrives during the withdrawal, the caller passes instead.
    A party that dies inside ``wait`` leaves the round short by one; the others time out.
    """

    name: str
    is_creator: bool
    slots: int
    parties: int
    _map: mmap.mmap
    _lock_sem: posix_ipc.Semaphore
    _gates: tuple[posix_ipc.Semaphore, ...]
    _closed: bool
    if TYPE_CHECKING:  # finalize is generic in the stubs only: keep this from pdoc's eval
        _finalizer: weakref.finalize[[str, int], Mailbox] | None

    def __init__(self) -> None:
        raise TypeError("use Mailbox.create(...) or Mailbox.attach(name)")

    @classmethod
    def _new(
        cls,
        name: str,
        creator: bool,
        mapped: mmap.mmap,
        sems: tuple[posix_ipc.Semaphore, ...],
        slots: int,
        parties: int,
    ) -> Mailbox:
        self = object.__new__(cls)
        self.name = name
        self.is_creator = creator
        self.slots = slots
        self.parties = parties
        self._map = mapped
        self._lock_sem, *gates = sems
        self._gates = tuple(gates)
        self._closed = False
        self._finalizer = (
            weakref.finalize(self, _unlink_all, name, os.getpid()) if creator else None
        )
        return self

    # -- creation ------------------------------------------------------------------------

    @classmethod
    def create(cls, slots: int = 1, parties: int = 2, *, name: str | None = None) -> Mailbox:
        """Create a mailbox (mode 0600, ``O_EXCL``) and return it attached.

        ``name`` defaults to ``/hipipc-mbox-<random>``; read :attr:`name` to pass it on.
        Raises ``hipErrorInvalidValue`` for bad sizes or a name that already exists, and
        ``hipErrorOperatingSystem`` when the system refuses (limits, permissions).
        """
        for what, value, low in (("slots", slots, 1), ("parties", parties, 1)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not low <= value <= _MAX_SLOTS
            ):
                raise _invalid(
                    f"Mailbox {what} must be an int in [{low}, {_MAX_SLOTS}], got {value!r}"
                )
        name = _check_name(name) if name is not None else f"/hipipc-mbox-{secrets.token_hex(8)}"
        size = _MB_HEADER_SIZE + slots * _SLOT_SIZE
        sems: list[posix_ipc.Semaphore] = []
        mapped = None
        shm_created = False
        try:
            # Semaphores first: an attacher that finds the segment finds everything.
            for sem_name, initial in zip(_names(name), (1, 0, 0), strict=True):
                sems.append(posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, 0o600, initial))
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, 0o600, size)
            shm_created = True
            try:
                mapped = mmap.mmap(shm.fd, size)
            finally:
                shm.close_fd()
            # The magic goes last: attachers treat a segment without it as not ready yet.
            _MB_HEADER.pack_into(mapped, 0, b"\0" * 8, _MB_VERSION, slots, parties, 0, 0)
            mapped[0:8] = _MB_MAGIC
        except BaseException as exc:
            # Undo only what this call created: a clashing name belongs to someone else.
            if mapped is not None:
                mapped.close()
            if shm_created:
                posix_ipc.unlink_shared_memory(name)
            for sem in sems:
                posix_ipc.unlink_semaphore(sem.name)
                sem.close()
            if isinstance(exc, posix_ipc.ExistentialError):
                raise _invalid(
                    f"a mailbox (or one of its semaphores) named {name!r} exists "
                    "already; pick another name or let hipipc choose one"
                ) from None
            if isinstance(exc, posix_ipc.Error):
                raise HipError(
                    hipError_t.hipErrorOperatingSystem, f"cannot create mailbox {name!r}: {exc}"
                ) from exc
            raise
        return cls._new(name, True, mapped, tuple(sems), slots, parties)

    @classmethod
    def attach(cls, name: str, *, timeout: float | None = 0.0) -> Mailbox:
        """Attach to the mailbox ``name``, waiting up to ``timeout`` s for it to be created.

        Raises ``hipErrorNotFound`` if it does not exist (in time), and
        ``hipErrorInvalidResourceHandle`` if the name holds something that is not a mailbox
        or belongs to another user.
        """
        name = _check_name(name)
        deadline = _deadline(timeout)
        delay = 0.001
        while True:
            try:
                return cls._attach_once(name)
            except _NotReady as exc:
                if deadline is None or time.monotonic() < deadline:
                    left = remaining(deadline)
                    time.sleep(delay if left is None else min(delay, left))
                    delay = min(delay * 2, 0.05)
                    continue
                raise HipError(
                    hipError_t.hipErrorNotFound,
                    f"no mailbox named {name!r} ({exc}); create it first, or pass "
                    "a timeout to wait for its creator",
                ) from None

    @classmethod
    def _attach_once(cls, name: str) -> Mailbox:
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise _NotReady("it does not exist") from None
        except posix_ipc.PermissionsError as exc:
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle, f"mailbox {name!r}: {exc}"
            ) from None
        except (posix_ipc.Error, ValueError, OSError) as exc:
            # Anyone may plant a name in /dev/shm: a directory (ValueError), a symlink (ELOOP).
            raise HipError(
                hipError_t.hipErrorInvalidResourceHandle,
                f"{name!r} is not a hipipc mailbox ({exc})",
            ) from None
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.geteuid():
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"mailbox {name!r} belongs to uid {st.st_uid}, not to this "
                    f"user ({os.geteuid()}); refusing to trust its handles",
                )
            if not stat.S_ISREG(st.st_mode):  # a FIFO someone planted under the name
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"{name!r} is not a hipipc mailbox (not a regular file)",
                )
            if st.st_size < _MB_HEADER_SIZE:
                raise _NotReady("it is still being created")
            mapped = mmap.mmap(shm.fd, st.st_size)
        finally:
            shm.close_fd()
        sems: list[posix_ipc.Semaphore] = []
        try:
            magic, version, slots, parties, _c, _g = _MB_HEADER.unpack_from(mapped, 0)
            if magic != _MB_MAGIC:
                if magic == b"\0" * 8:
                    raise _NotReady("it is still being created")
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle, f"{name!r} is not a hipipc mailbox"
                )
            if (
                version != _MB_VERSION
                or not 1 <= slots <= _MAX_SLOTS
                or not 1 <= parties <= _MAX_SLOTS
                or st.st_size < _MB_HEADER_SIZE + slots * _SLOT_SIZE
            ):
                raise HipError(
                    hipError_t.hipErrorInvalidResourceHandle,
                    f"mailbox {name!r} has an unsupported version or layout",
                )
            for sem_name in _names(name):
                try:
                    sems.append(posix_ipc.Semaphore(sem_name))
                except posix_ipc.ExistentialError:
                    raise HipError(
                        hipError_t.hipErrorInvalidResourceHandle,
                        f"mailbox {name!r} lost its semaphore {sem_name!r} "
                        "(unlinked by its creator?)",
                    ) from None
        except BaseException:
            for sem in sems:
                sem.close()
            mapped.close()
            raise
        return cls._new(name, False, mapped, tuple(sems), slots, parties)

    # -- slots ---------------------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        self._check_open()
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise _invalid(f"mailbox slot must be an int in [0, {self.slots}), got {slot!r}")
        return _MB_HEADER_SIZE + slot * _SLOT_SIZE

    def _locked(self, deadline: float | None) -> None:
        if not _acquire(self._lock_sem, deadline):
            raise TimeoutError(
                f"mailbox {self.name}: lock not acquired in time (a process "
                "may have died holding it)"
            )

    def put(
        self,
        slot: int,
        mem: IpcMemHandle | bytes | bytearray | memoryview | None = None,
        event: IpcEventHandle | bytes | bytearray | memoryview | None = None,
        *,
        timeout: float | None = _LOCK_GRACE,
    ) -> None:
        """Write ``mem`` (an :class:`IpcMemHandle` or 64 bytes) and/or ``event`` into ``slot``.

        A side passed as None is cleared.  Raises ``hipErrorInvalidValue`` for a bad slot or
        malformed handle bytes.
        """
        base = self._slot(slot)
        for side, what in ((mem, "mem"), (event, "event")):
            refuse_objects(side, f"Mailbox.put {what}")
        mem_raw = bytes(IpcMemHandle.coerce(mem)) if mem is not None else bytes(HANDLE_SIZE)
        ev_raw = bytes(IpcEventHandle.coerce(event)) if event is not None else bytes(HANDLE_SIZE)
        flags = (_HAS_MEM if mem is not None else 0) | (_HAS_EVENT if event is not None else 0)
        self._locked(_deadline(timeout))
        try:
            self._map[base : base + HANDLE_SIZE] = mem_raw
            self._map[base + HANDLE_SIZE : base + 2 * HANDLE_SIZE] = ev_raw
            _SLOT_FLAGS.pack_into(self._map, base + 2 * HANDLE_SIZE, flags)
        finally:
            self._lock_sem.release()

    def get(
        self, slot: int, *, timeout: float | None = _LOCK_GRACE
    ) -> tuple[IpcMemHandle | None, IpcEventHandle | None]:
        """The (memory, event) handles in ``slot`` now; None where a side is empty.

        The bytes are parsed as untrusted input: ``hipErrorInvalidValue`` if they are not a
        valid handle.
        """
        base = self._slot(slot)
        self._locked(_deadline(timeout))
        try:
            raw = bytes(self._map[base : base + 2 * HANDLE_SIZE])
            (flags,) = _SLOT_FLAGS.unpack_from(self._map, base + 2 * HANDLE_SIZE)
        finally:
            self._lock_sem.release()
        mem = IpcMemHandle(raw[:HANDLE_SIZE]) if flags & _HAS_MEM else None
        event = IpcEventHandle(raw[HANDLE_SIZE:]) if flags & _HAS_EVENT else None
        return mem, event

    def poll(
        self, slot: int, timeout: float | None
    ) -> tuple[IpcMemHandle | None, IpcEventHandle | None]:
        """Wait until ``slot`` holds a handle and return it; TimeoutError after ``timeout`` s."""
        deadline = _deadline(timeout)
        delay = 0.0005
        while True:
            left = remaining(deadline)
            got = self.get(slot, timeout=_LOCK_GRACE if left is None else left)
            if got != (None, None):
                return got
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"mailbox {self.name}: slot {slot} still empty after {timeout} s"
                )
            left = remaining(deadline)
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.02)

    def clear(self, slot: int) -> None:
        """Empty ``slot``."""
        self.put(slot)

    # -- barrier -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> int:
        """Block until all ``parties`` processes have called ``wait``; return the round number.

        Raises :class:`TimeoutError` after ``timeout`` seconds (None: no limit); the caller
        is then withdrawn from the round and the barrier stays usable.
        """
        self._check_open()
        deadline = _deadline(timeout)
        gen: int  # the round number: a u32 of the mailbox header
        self._locked(deadline)
        try:
            count, gen = _COUNTERS.unpack_from(self._map, _COUNTERS_OFFSET)
            count += 1
            if count >= self.parties:
                _COUNTERS.pack_into(self._map, _COUNTERS_OFFSET, 0, (gen + 1) & 0xFFFFFFFF)
                gate = self._gates[gen % 2]
                for _ in range(self.parties - 1):
                    gate.release()
                return gen
            _COUNTERS.pack_into(self._map, _COUNTERS_OFFSET, count, gen)
        finally:
            self._lock_sem.release()
        gate = self._gates[gen % 2]
        if _acquire(gate, deadline):
            return gen
        # Timed out: withdraw, unless the round completed while we were giving up.
        self._locked(time.monotonic() + _LOCK_GRACE)
        try:
            count, now_gen = _COUNTERS.unpack_from(self._map, _COUNTERS_OFFSET)
            if now_gen == gen:
                # Never below zero, whatever another process of this uid wrote meanwhile.
                _COUNTERS.pack_into(self._map, _COUNTERS_OFFSET, max(count - 1, 0), gen)
                raise TimeoutError(
                    f"mailbox {self.name}: barrier round {gen} timed out after {timeout} s "
                    f"with {count} of {self.parties} parties arrived"
                )
        finally:
            self._lock_sem.release()
        # The last party released our pass just now: take it.
        if not _acquire(gate, time.monotonic() + _LOCK_GRACE):
            raise TimeoutError(f"mailbox {self.name}: barrier state is inconsistent")
        return gen

    # -- lifetime ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise _invalid(f"mailbox {self.name} is closed")

    def close(self) -> None:
        """Detach; the creator also unlinks the names (other attachers keep working).

        Idempotent; never raises for a name already unlinked.
        """
        if self._closed:
            return
        self._closed = True
        for sem in (self._lock_sem, *self._gates):
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        try:
            self._map.close()
        except BufferError:  # a memoryview of ours is still alive; the GC unmaps later
            pass
        if self._finalizer is not None:
            self._finalizer()

    def unlink(self) -> None:
        """Remove the names now (creator or not); attached processes keep working."""
        _unlink_all(self.name, os.getpid())

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "creator" if self.is_creator else "attached"
        state = "closed" if self._closed else "open"
        return f"<Mailbox {self.name} {role} {state} slots={self.slots} parties={self.parties}>"


class _NotReady(Exception):
    pass


# -- one handle per message ------------------------------------------------------------


def parse_handle(raw: Any) -> IpcMemHandle | IpcEventHandle:
    """Parse 64 untrusted bytes as a memory or an event handle (by its kind byte)."""
    if isinstance(raw, IpcHandle):
        # IpcHandle itself parses no kind: every instance is one of the two subclasses.
        return cast("IpcMemHandle | IpcEventHandle", raw)
    refuse_objects(raw, "a handle")
    try:
        data = bytes(memoryview(raw).cast("B"))
    except (TypeError, ValueError):
        raise _invalid(f"a handle is {HANDLE_SIZE} bytes, not {type(raw).__name__}") from None
    if len(data) == HANDLE_SIZE and data[5] in _EVENT_KINDS:
        return IpcEventHandle(data)
    return IpcMemHandle(data)


def create_handle_queue(
    name: str | None = None, *, max_messages: int = 8
) -> posix_ipc.MessageQueue:
    """Create a POSIX message queue for handles (mode 0600, ``O_EXCL``, 64-byte messages).

    ``name`` defaults to ``/hipipc-mq-<random>`` (read ``.name``).  The caller owns it:
    ``posix_ipc.unlink_message_queue(mq.name)`` then ``mq.close()``.  ``max_messages`` is
    capped by ``/proc/sys/fs/mqueue/msg_max`` (10 by default) for unprivileged users.
    """
    name = _check_name(name) if name is not None else f"/hipipc-mq-{secrets.token_hex(8)}"
    if (
        isinstance(max_messages, bool)
        or not isinstance(max_messages, int)
        or not 1 <= max_messages <= _MAX_SLOTS
    ):
        raise _invalid(f"max_messages must be an int in [1, {_MAX_SLOTS}], got {max_messages!r}")
    try:
        return posix_ipc.MessageQueue(name, posix_ipc.O_CREX, 0o600, max_messages, HANDLE_SIZE)
    except posix_ipc.ExistentialError:
        raise _invalid(f"a message queue named {name!r} exists already") from None
    except (posix_ipc.Error, ValueError, OSError) as exc:
        raise HipError(
            hipError_t.hipErrorOperatingSystem,
            f"cannot create message queue {name!r}: {exc} (max_messages "
            "above /proc/sys/fs/mqueue/msg_max?)",
        ) from exc


def send_handle(
    channel: Any, handle: IpcHandle | bytes | bytearray | memoryview, timeout: float | None = None
) -> None:
    """Send one handle (64 bytes) over ``channel``.

    ``channel``: a ``posix_ipc.MessageQueue``, a stream ``socket.socket`` (blocking or not)
    or a ``multiprocessing`` ``Connection``.  ``timeout`` (seconds, None or inf: no limit)
    bounds the whole send.  Raises ``TimeoutError`` when a full queue, socket or pipe does not
    accept it in time, ``EOFError`` when the peer has closed the channel, and
    ``hipErrorInvalidValue`` for a malformed handle, a bad timeout, a closed or unknown
    channel.
    """
    raw = bytes(parse_handle(handle))
    end = deadline(timeout, "send_handle timeout")
    if isinstance(channel, posix_ipc.MessageQueue):
        try:
            channel.send(raw, remaining(end))
        except posix_ipc.BusyError:
            raise TimeoutError(
                f"message queue {channel.name} stayed full for {timeout} s"
            ) from None
        except posix_ipc.Error as exc:
            raise _invalid(
                f"cannot send on message queue {channel.name}: {exc} (closed, or opened read-only?)"
            ) from None
    elif isinstance(channel, (socket.socket, Connection)):
        write_frame(channel, raw, end)
    else:
        raise _invalid(
            f"cannot send a handle over a {type(channel).__name__}: use a "
            "posix_ipc.MessageQueue, a socket or a multiprocessing Connection"
        )


def recv_handle(channel: Any, timeout: float | None = None) -> IpcMemHandle | IpcEventHandle:
    """Receive one handle sent by :func:`send_handle` and parse it.

    ``timeout`` (seconds, None or inf: no limit) bounds the whole receive, however the peer
    dribbles its bytes.  Raises ``TimeoutError`` when nothing complete arrives in time (what
    arrived of a handle is kept: the next call on the channel continues it), ``EOFError``
    when the peer closed the channel between handles, and ``hipErrorInvalidValue`` for a
    message that is not a valid handle (wrong length, truncated by a closing peer, garbage),
    a bad timeout, or a closed or unknown channel.  A message longer than a handle on a
    ``Connection`` is reported once and skipped, so the channel stays in step.
    """
    end = deadline(timeout, "recv_handle timeout")
    if isinstance(channel, posix_ipc.MessageQueue):
        try:
            raw, _priority = channel.receive(remaining(end))
        except posix_ipc.BusyError:
            raise TimeoutError(f"no handle arrived on {channel.name} within {timeout} s") from None
        except posix_ipc.Error as exc:
            raise _invalid(
                f"cannot receive on message queue {channel.name}: {exc} "
                "(closed, or opened write-only?)"
            ) from None
    elif isinstance(channel, socket.socket):
        raw = read_frame(channel, HANDLE_SIZE, end, framed=False)
    elif isinstance(channel, Connection):
        raw = read_frame(channel, HANDLE_SIZE, end, framed=True)
    else:
        raise _invalid(
            f"cannot receive a handle from a {type(channel).__name__}: use a "
            "posix_ipc.MessageQueue, a socket or a multiprocessing Connection"
        )
    if len(raw) != HANDLE_SIZE:
        raise _invalid(f"received {len(raw)} bytes, a handle is {HANDLE_SIZE}")
    return parse_handle(raw)


_FDS_MAX = 253  # SCM_MAX_FD: the kernel's limit of descriptors in one message
_FD_SIZE = struct.calcsize("i")


def _unix_socket(sock: Any, what: str) -> socket.socket:
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
        raise _invalid(f"{what} needs an AF_UNIX socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise _invalid(f"{what}: the socket is closed")
    return sock


def _ready(sock: socket.socket, end: float | None, event: int, what: str) -> None:
    """Wait until ``sock`` is ready for ``event`` (select.POLLIN/POLLOUT) before ``end``."""
    import select

    poller = select.poll()
    poller.register(sock, event)
    while True:
        left = remaining(end)
        if poller.poll(None if left is None else max(0, int(left * 1000) + 1)):
            return
        if left is not None and left <= 0:
            raise TimeoutError(f"{what} timed out")


def send_fds(sock: Any, fds: list[int], data: bytes = b"\0", timeout: float | None = None) -> None:
    """Send the descriptors ``fds`` (1 to 253) and ``data`` (at least one byte) in one
    SCM_RIGHTS message over the AF_UNIX socket ``sock``.

    This is how a memory pool's shareable handle (``hipMemPoolExportToShareableHandle``, a
    POSIX fd) reaches another process, as in CUDA's ``streamOrderedAllocationIPC``.  The
    caller keeps its descriptors.  Raises ``hipErrorInvalidValue`` for a bad socket, fd list
    or timeout, ``TimeoutError`` when the socket does not accept the message in time.
    """
    sock = _unix_socket(sock, "send_fds")
    try:
        fd_list = [operator.index(fd) for fd in fds]
    except TypeError:
        raise _invalid("send_fds needs a list of integer descriptors") from None
    if not 1 <= len(fd_list) <= _FDS_MAX or min(fd_list) < 0:
        raise _invalid(f"send_fds sends 1 to {_FDS_MAX} non-negative descriptors")
    payload = bytes(data)
    if not payload:
        raise _invalid("send_fds needs at least one byte of data to carry the descriptors")
    end = deadline(timeout, "send_fds timeout")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fd_list)}i", *fd_list))]
    while True:
        _ready(sock, end, 4, "send_fds")  # POLLOUT
        try:
            # MSG_NOSIGNAL: a peer that closed must not kill a process whose SIGPIPE is
            # SIG_DFL (the fd server answers untrusted clients with this).
            sent = sock.sendmsg([payload], ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == 9:  # EBADF: a descriptor in fds is not open
                raise _invalid(f"send_fds: a descriptor in {fd_list} is not open") from None
            raise
        if sent != len(payload):  # a stream socket took part of it: the rest without fds
            sock.sendall(payload[sent:], socket.MSG_NOSIGNAL)
        return


def recv_fds(
    sock: Any, maxfds: int = 1, bufsize: int = 4096, timeout: float | None = None
) -> tuple[bytes, list[int]]:
    """Receive one message sent by :func:`send_fds`: (its data, its descriptors).

    Descriptors arrive close-on-exec (``MSG_CMSG_CLOEXEC``; the stdlib's
    ``socket.recv_fds`` leaves them inheritable) and are the caller's to close.  A message
    with more than ``maxfds`` descriptors, or (datagram and seqpacket sockets) more than
    ``bufsize`` bytes, is refused and every one of its descriptors closed.  Raises
    ``EOFError`` when the peer closed the socket, ``TimeoutError`` when nothing arrives in
    time and ``hipErrorInvalidValue`` for bad arguments or a truncated message.
    """
    sock = _unix_socket(sock, "recv_fds")
    try:
        maxfds, bufsize = operator.index(maxfds), operator.index(bufsize)
    except TypeError:
        raise _invalid("recv_fds: maxfds and bufsize must be integers") from None
    if not 1 <= maxfds <= _FDS_MAX or not 1 <= bufsize <= 1 << 20:
        raise _invalid(f"recv_fds: maxfds must be 1 to {_FDS_MAX}, bufsize 1 to 2**20")
    end = deadline(timeout, "recv_fds timeout")
    flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
    while True:
        _ready(sock, end, 1, "recv_fds")  # POLLIN
        try:
            data, ancdata, msg_flags, _addr = sock.recvmsg(
                bufsize, socket.CMSG_SPACE(_FDS_MAX * _FD_SIZE), flags
            )
        except BlockingIOError:
            continue
        break
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(blob) - len(blob) % _FD_SIZE
            fds.extend(struct.unpack(f"{usable // _FD_SIZE}i", blob[:usable]))
    if msg_flags & socket.MSG_CTRUNC or len(fds) > maxfds:
        for fd in fds:
            os.close(fd)
        raise _invalid(f"recv_fds: the message carried more than {maxfds} descriptors")
    if msg_flags & socket.MSG_TRUNC:  # a datagram longer than bufsize: its data is cut
        for fd in fds:
            os.close(fd)
        raise _invalid(f"recv_fds: the message was longer than bufsize ({bufsize} bytes)")
    if not data and not fds:
        raise EOFError("recv_fds: the peer closed the socket")
    return data, fds
