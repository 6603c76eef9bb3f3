"""The fd transport: segments in sealed memfds that no file system names (issue 13).

Allocation: one memfd per allocation or interprocess event (:func:`hipipc.memfd.create_memfd`:
close-on-exec, reserved up front, sealed against shrinking, growing and further seals), with
the same header page as a store segment, then the payload.  The handle's tail
(:class:`hipipc.handle.FdRoute`) names the exporter (pid, start time), its descriptor number
of the memfd, and the memfd's inode.  The exporter keeps that descriptor at that number for
the life of the allocation, so the handle is fixed at allocation and never changes.

Open (the handle alone says how): the node tag; a cached pidfd of (pid, start time), its start
time checked at first sight so that a reused pid is refused; ``pidfd_getfd`` (the kernel's
ptrace check is the uid boundary); then, before any read or mapping, ``fstat``: a regular
memfd of the handle's uid whose inode is the handle's (else a stale handle: the exporter freed
it, or restarted and the number names another file), its seals, its size; then the identity
in the header, compared in constant time.  Where the kernel refuses ``pidfd_getfd`` (EPERM:
another uid, a non-dumpable exporter, Yama, seccomp; ENOSYS) the importer asks the exporter's
SCM_RIGHTS server instead (:func:`hipipc.fdserver.fetch`), with the same checks after.

Revocation: ``hipFree`` closes the exporter's descriptor (``pidfd_getfd`` then fails with EBADF,
or returns another file whose inode is refused) and withdraws it from the server; an exit,
normal or kill -9, closes every descriptor at once, and the pidfd says the exporter is gone.
Nothing is left to collect: the kernel frees the memory with its last descriptor and mapping.

A descriptor taken with ``pidfd_getfd`` or SCM_RIGHTS shares the exporter's open file
description, so an interprocess event's OFD lock is taken on a description of its own
(:func:`own_description`), never on the shared one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hmac
import os
import secrets
import select
import stat
import threading
import time
from typing import ClassVar, TypeVar

from . import fdserver
from .errors import HipError, hipError_t
from .handle import NODE_ENV, FdRoute, HandleKind, IpcHandle, node_tag
from .memfd import F_SEAL_WRITE, SEALS, create_memfd, memfd_supported, seals_of
from .segment import (
    _EXPORTER,
    _IDENTITY,
    _identity,
    own_process,
    proc_stat_fields,
    process_start_time,
)
from .segstore import Transport
from .store import _TICKET_BYTES, PAGE_SIZE, _os_call, ticket_name

__all__ = [
    "FdTransport",
    "TRANSPORT_ENV",
    "default_transport",
    "resolve_transport",
    "reset_default_transport",
    "fd_route_supported",
    "own_description",
]

TRANSPORT_ENV = "HIPIPC_TRANSPORT"
_CHOICES = ("store", "fd", "auto")
# Seals that forbid a shared writable mapping (<linux/fcntl.h>; FUTURE_WRITE is Linux 5.1+).
_WRITE_SEALS = F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_H = TypeVar("_H", bound=IpcHandle)

# -- pidfd_getfd (Linux 5.6+; not in Python's os module) --------------------------------------

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long]


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate of ``fd`` of the process behind ``pidfd`` (the kernel makes it
    close-on-exec); OSError with the kernel's errno otherwise."""
    result: int = _syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _exited(pidfd: int, wait_ms: int = 0) -> bool:
    """Whether the process behind ``pidfd`` has exited (a zombie included), waiting up to
    ``wait_ms`` for it to finish exiting."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(wait_ms))


def _exiting(pid: int, grace: float = 0.2) -> bool:
    """Whether ``pid`` has exited or finishes exiting within ``grace`` seconds (a process
    killed a moment ago: its threads are still being torn down).  Error paths only."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return True  # no such process any more
    try:
        return _exited(pidfd, int(grace * 1000))
    finally:
        os.close(pidfd)


def _leader_gone(pid: int) -> bool:
    """Whether the thread-group leader of the live process ``pid`` shows as a zombie (its
    main thread exited while other threads run); read only on an error path."""
    try:
        fields = proc_stat_fields(pid)
    except (OSError, ValueError):
        return False
    return bool(fields) and fields[0] == b"Z"


class _Pidfds:
    """Cached pidfds of exporters, by (pid, start time); at most :attr:`LIMIT` (oldest evicted).

    ``getfd`` runs under the lock, so an eviction never closes a pidfd under a caller (whose
    number another file could then take)."""

    LIMIT = 64

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def getfd(self, pid: int, start: int, fd: int) -> int:
        """``pidfd_getfd`` of ``fd`` in process (pid, start).  OSError: ESRCH when that
        process is gone (exited, a zombie, or the pid now names another process), EBADF when
        it has no such descriptor, the kernel's errno otherwise (EPERM, ENOSYS, EMFILE...)."""
        key = (pid, start)
        with self._lock:
            pidfd = self._cache.get(key)
            if pidfd is None:
                pidfd = self._first_sight(pid, start)
            try:
                return _pidfd_getfd(pidfd, fd)
            except OSError as exc:
                # A zombie has no descriptor table (EBADF): the pidfd tells it from a free.
                if exc.errno in (errno.EBADF, errno.ESRCH) and _exited(pidfd):
                    del self._cache[key]
                    os.close(pidfd)
                    raise OSError(errno.ESRCH, os.strerror(errno.ESRCH)) from None
                if exc.errno in (errno.EBADF, errno.ESRCH) and _leader_gone(pid):
                    # A main thread that called pthread_exit while the others run: the
                    # kernel finds no descriptor table through the leader, but the process
                    # and its exports live.  Its server thread can still send (EPERM routes
                    # the open there, as for any refused pidfd_getfd).
                    raise OSError(errno.EPERM, "the exporter's main thread has exited") from None
                raise

    def _first_sight(self, pid: int, start: int) -> int:
        # The start time is read after the pidfd exists: a match proves the pidfd is the
        # exporter's, not a reused pid's.
        try:
            pidfd = os.pidfd_open(pid)
        except AttributeError:
            raise OSError(errno.ENOSYS, "pidfd_open is not available") from None
        now = process_start_time(pid)
        if now is None or now not in (-1, start) or _exited(pidfd):
            os.close(pidfd)
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        self._cache[pid, start] = pidfd
        if len(self._cache) > self.LIMIT:
            os.close(self._cache.pop(next(iter(self._cache))))
        return pidfd

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, the inherited pidfds closed while still ours."""
        self._lock = threading.Lock()
        stale, self._cache = self._cache, {}
        for pidfd in stale.values():
            try:
                os.close(pidfd)
            except OSError:
                pass


_pidfds = _Pidfds()
os.register_at_fork(after_in_child=_pidfds.after_fork)


# -- the per-process choice ----------------------------------------------------------------


def fd_route_supported() -> bool:
    """Whether this kernel gives the fd transport: sealable memfds, ``pidfd_open`` and
    ``pidfd_getfd`` (Linux 5.6+, not refused by seccomp).  Asked once per process; at the
    descriptor limit, ``hipErrorOutOfMemory`` naming it (and asked again next time)."""
    global _supported
    if _supported is None:
        _supported = memfd_supported() and _pidfd_getfd_works()
    return _supported


_supported: bool | None = None


def _pidfd_getfd_works() -> bool:
    # At the descriptor limit the probe proves nothing: _os_call raises hipErrorOutOfMemory
    # naming the limit, and nothing is remembered (a cached False refused the fd transport
    # for the rest of the process's life).
    what = "probing for pidfd_getfd"
    try:
        pidfd = _os_call(what, os.pidfd_open, os.getpid())
    except (AttributeError, OSError):
        return False
    try:
        os.close(_os_call(what, _pidfd_getfd, pidfd, pidfd))
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def resolve_transport(value: str) -> str:
    """``"store"`` or ``"fd"`` for a transport name (``auto``: fd where the kernel supports
    it).  ``hipErrorInvalidValue`` for another name, ``hipErrorNotSupported`` for ``fd`` on a
    kernel without it."""
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in _CHOICES:
        raise HipError(
            hipError_t.hipErrorInvalidValue,
            f"transport {value!r} is not one of store, fd, auto "
            f"(set by the transport argument or ${TRANSPORT_ENV})",
        )
    if choice == "auto":
        return "fd" if fd_route_supported() else "store"
    if choice == "fd" and not fd_route_supported():
        raise HipError(
            hipError_t.hipErrorNotSupported,
            "the fd transport needs sealable memfds, pidfd_open and pidfd_getfd (Linux 5.6+, "
            f"not refused by seccomp): use the store transport ({TRANSPORT_ENV}=store)",
        )
    return choice


_default: str | None = None


def default_transport() -> str:
    """This process's transport for new allocations and events: ``$HIPIPC_TRANSPORT``
    (``store``, the default, ``fd`` or ``auto``), read at the first allocation and kept for
    the life of the process (a forked child inherits it)."""
    global _default
    choice = _default
    if choice is None:
        choice = _default = resolve_transport(os.environ.get(TRANSPORT_ENV) or "store")
    return choice


def reset_default_transport() -> None:
    """Forget the process's choice, so the next allocation reads ``$HIPIPC_TRANSPORT`` again
    (tests switch transports within one process)."""
    global _default
    _default = None


def own_description(fd: int) -> int:
    """A new open file description of the file behind ``fd`` (``O_RDWR``, close-on-exec).

    A descriptor taken from another process shares that process's description, and with it
    any OFD lock on it: an interprocess event locks through a description of its own."""
    try:
        return _os_call(
            "opening an interprocess event",
            os.open,
            f"/proc/self/fd/{fd}",
            os.O_RDWR | os.O_CLOEXEC,
        )
    except OSError as exc:
        raise HipError(
            hipError_t.hipErrorOperatingSystem,
            f"cannot reopen the event's memory file: {exc.strerror}",
        ) from exc


# -- the transport -------------------------------------------------------------------------


def _close_if_ours(fd: int, handle: IpcHandle) -> None:
    """Close the exported memfd at ``fd``, unless the process's own code closed it behind our
    back: then the number is free (nothing to do) or names another file of the process's,
    which must not be closed for it."""
    route = handle._route
    try:
        st = os.fstat(fd)
    except OSError:
        return
    if route is not None and stat.S_ISREG(st.st_mode) and st.st_ino == route.inode:
        os.close(fd)


def _probe_stat() -> None:
    os.close(os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC))


def _refused(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidResourceHandle, detail)


_memfd_dev: int | None = None


def _memfd_device() -> int:
    """The st_dev every memfd has (the kernel's internal shm mount): a descriptor on any
    other file system is never a segment, whatever its inode number."""
    global _memfd_dev
    if _memfd_dev is None:
        # At the descriptor limit: the soft limit raised, else hipErrorOutOfMemory naming it
        # (a bare OSError escaped the first open of a process that had one descriptor left).
        fd = _os_call("opening a handle", os.memfd_create, "hipipc", os.MFD_CLOEXEC)
        try:
            _memfd_dev = os.fstat(fd).st_dev
        finally:
            os.close(fd)
    return _memfd_dev


class FdTransport(Transport):
    """Segments in sealed memfds, opened with ``pidfd_getfd`` (module docstring)."""

    name: ClassVar[str] = "fd"
    keeps_published: ClassVar[bool] = True

    def __init__(self) -> None:
        # Reentrant: a DeviceBuffer in a reference cycle is freed wherever the garbage
        # collector runs, which may be inside publish (a Lock deadlocked hipIpcGetMemHandle).
        self._lock = threading.RLock()
        # Descriptors revoked in the server thread, closed by the next call (revoke).
        self._close_later: list[tuple[int, IpcHandle]] = []
        # Exports of this process: segment name -> (the memfd's descriptor, share mode).
        self._held: dict[str, tuple[int, int]] = {}
        self._tickets: set[str] = set()  # ticket keys offered and not known consumed
        self._offered = False  # whether the descriptor server was ever asked to serve
        self.exiting = False

    # -- exporter side -------------------------------------------------------------------

    def new_segment(
        self, handle_type: type[_H], kind: HandleKind, size: int, device: int
    ) -> tuple[_H, int]:
        pid, start, pidns = own_process()
        if start <= 0:
            # At the descriptor limit /proc/self/stat cannot be read: hipErrorOutOfMemory
            # naming the limit, unless raising the soft limit makes room to read it now.
            try:
                _os_call("reading this process's start time", _probe_stat)
                pid, start, pidns = own_process()
            except OSError:  # no /proc: hipErrorNotSupported below
                pass
        if start <= 0:
            raise HipError(
                hipError_t.hipErrorNotSupported,
                "the fd transport needs this process's start time (/proc/self/stat)",
            )
        try:
            fd = create_memfd(PAGE_SIZE + -(-size // PAGE_SIZE) * PAGE_SIZE)
        except HipError as exc:
            if "RLIMIT_NOFILE" not in exc.detail:
                raise
            raise HipError(
                exc.code,
                f"{exc.detail}; in the fd transport an exported allocation or event keeps its "
                "descriptor too (free them, or export with HIPIPC_TRANSPORT=store)",
            ) from exc
        try:
            route = FdRoute(pid, start, fd, os.fstat(fd).st_ino)
            handle = handle_type.new(kind, size, device, os.geteuid(), route)
            os.pwrite(fd, _identity(handle) + _EXPORTER.pack(pid, pidns, start, time.time()), 0)
        except BaseException:
            os.close(fd)
            raise
        return handle, fd

    def publish(self, fd: int, handle: IpcHandle, mode: int) -> None:
        """Keep ``fd`` (its number is in the handle) and offer it to the descriptor server."""
        self._refuse_if_exiting()
        name = handle.segment_name
        with self._lock:
            self._held[name] = (fd, mode)
            self._offered = True
            try:
                fdserver.offer(name, fd, mode)
            except BaseException:
                del self._held[name]
                raise
        if self.exiting:  # the exit rule started meanwhile and may have missed this one
            with self._lock:
                entry = self._held.pop(name, None)
            fdserver.withdraw(name)
            if entry is not None:  # still ours to refuse: the caller keeps the descriptor
                self._refuse_if_exiting()
            # Else the rule's revoke took and closed it: published and revoked, like an
            # export made just before the rule.

    def revoke(self, handle: IpcHandle) -> None:
        """Withdraw the export and close its descriptor: ``pidfd_getfd`` of the number then
        fails, or finds another file whose inode is refused."""
        name = handle.segment_name
        with self._lock:
            entry = self._held.pop(name, None)
        fdserver.withdraw(name)
        if fdserver._in_server_thread():
            # A finalizer run by the garbage collector in the server thread, maybe between its
            # check of this descriptor and its send: closed now, the number could name
            # another file by the send.  The next revoke (or the exit rule) closes it.
            if entry is not None:
                with self._lock:
                    self._close_later.append((entry[0], handle))
            return
        if entry is not None:
            _close_if_ours(entry[0], handle)
        self._close_deferred()

    def _close_deferred(self) -> None:
        if self._close_later:
            with self._lock:
                later, self._close_later = self._close_later, []
            for fd, handle in later:
                _close_if_ours(fd, handle)

    def issue_ticket(self, handle: IpcHandle) -> tuple[bytes, str]:
        """Offer the export once more, under a ticket key, to be fetched once: the server's
        reference keeps the memory alive after ``revoke`` until a receiver fetches it."""
        self._refuse_if_exiting()
        secret = secrets.token_bytes(_TICKET_BYTES)
        key = ticket_name(secret)
        with self._lock:  # under the lock: revoke cannot close the descriptor meanwhile
            entry = self._held.get(handle.segment_name)
            if entry is None:
                raise _refused(
                    "cannot send the memory: its export was revoked (freed, or the "
                    "process is exiting)"
                )
            fdserver.offer(key, entry[0], entry[1], once=True)
            self._tickets.add(key)
        if self.exiting:
            self.discard(key)
            self._refuse_if_exiting()
        return secret, key

    def issued(self, name: str) -> bool:
        """Whether ``name`` is a ticket this transport issued (and has not discarded)."""
        return name in self._tickets

    def exists(self, name: str) -> bool:
        if name not in self._tickets:
            return False
        if fdserver.pending(name):
            return True
        with self._lock:
            self._tickets.discard(name)
        return False

    def discard(self, name: str) -> bool:
        with self._lock:
            was = name in self._tickets
            self._tickets.discard(name)
        if was:
            fdserver.withdraw(name)
        return was

    def remove_if_empty(self) -> None:
        """The exit rule's last step: the server withdraws everything and stops."""
        if self._offered:
            fdserver.withdraw_all()
        self._close_deferred()

    def forget(self) -> None:
        """In a forked child: the parent's exports stay the parent's.  The child's copies of
        their descriptors (same numbers) are closed, so the child neither serves nor keeps
        alive memory it did not allocate; its own exports start from an empty table."""
        self._lock = threading.RLock()
        held, self._held = self._held, {}
        later, self._close_later = self._close_later, []
        for fd, _handle in later:
            try:
                os.close(fd)
            except OSError:
                pass
        self._tickets = set()
        self._offered = False
        for fd, _ in held.values():
            try:
                os.close(fd)
            except OSError:
                pass

    # -- importer side -------------------------------------------------------------------

    def open(self, handle: IpcHandle, ticket: bytes | None = None) -> int:
        """A descriptor of the memfd ``handle`` names (module docstring).  Raises
        ``hipErrorInvalidResourceHandle`` with the reason: another node, the exporter
        exited, the memory was freed (or the handle is stale), it is not shared with this
        uid, or it does not match the handle."""
        if handle.node != node_tag():
            raise _refused(
                f"the handle was exported on another node (node tag {handle.node:#06x}, this "
                f"process runs on {node_tag():#06x}); memory and events are shared only "
                f"within a node: move data between nodes with MPI (hipipc.mpi), or give every "
                f"process of one node the same ${NODE_ENV}",
            )
        route: FdRoute = handle._route  # type: ignore[assignment]
        fd = -1
        if ticket is not None:
            # Outside the try: a malformed ticket is hipErrorInvalidValue, as in the store,
            # never silently ignored.
            key = ticket_name(ticket)
            try:  # the server consumes a ticket; a consumed one falls back to the export
                fd = fdserver.fetch(route.pid, route.start, handle.uid, key)
            except HipError:
                fd = -1
        if fd < 0:
            fd = self._take(handle, route)
        try:
            self._check(fd, handle, route)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _take(handle: IpcHandle, route: FdRoute) -> int:
        try:
            return _os_call("opening a handle", _pidfds.getfd, route.pid, route.start, route.fd)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err == errno.ESRCH:
            # Whether it freed first cannot be told (the descriptor table died with it).
            raise _refused(
                f"the exporter (pid {route.pid}) exited: its exports died with it, as in CUDA"
            )
        if err == errno.EBADF:
            raise _refused(
                "no exported allocation or event matches this handle (freed by its exporter, "
                f"pid {route.pid}, or revoked by its exit)"
            )
        # EPERM/EACCES: the ptrace check (another uid, a non-dumpable exporter, Yama) or
        # seccomp; ENOSYS: an older kernel.  The exporter's server decides instead.
        try:
            return fdserver.fetch(route.pid, route.start, handle.uid, handle.segment_name)
        except HipError as exc:
            if _exiting(route.pid):
                # Killed while we asked: its leader was already a zombie, its other threads
                # (the server's among them) not yet gone.
                raise _refused(
                    f"the exporter (pid {route.pid}) exited: its exports died with it, as in CUDA"
                ) from None
            raise _refused(
                f"pidfd_getfd refused ({os.strerror(err)}) and the exporter's descriptor "
                f"server did not send it: {exc.detail}"
            ) from None

    @staticmethod
    def _check(fd: int, handle: IpcHandle, route: FdRoute) -> None:
        """Before any read or mapping: the file is the memfd the handle names; then its
        header's identity, in constant time."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != route.inode or st.st_dev != _memfd_device():
            raise _refused(
                f"the handle is stale: descriptor {route.fd} of the exporter (pid "
                f"{route.pid}) is another file now (freed by its exporter, or the exporter "
                "restarted)"
            )
        if st.st_uid != handle.uid:
            raise _refused(
                f"the memory file belongs to uid {st.st_uid}, the handle names uid {handle.uid}"
            )
        seals = seals_of(fd)
        if seals & SEALS != SEALS:
            raise _refused("the memory file is not sealed against shrinking and growing")
        if seals & _WRITE_SEALS:  # hipipc never adds these: a forged file, refused unmapped
            raise _refused("the memory file is sealed against writing: not a hipipc segment")
        if st.st_size < PAGE_SIZE + handle.size:
            raise _refused("the memory file is smaller than the handle says")
        raw = os.pread(fd, _IDENTITY.size, 0)
        if not hmac.compare_digest(raw, _identity(handle)):
            raise _refused("the segment does not match the handle")

    def consume_ticket(self, handle: IpcHandle, ticket: bytes) -> None:
        """Fetch the ticket and drop it: the exporter's server holds the memory for it."""
        route = handle._route
        if route is None:
            return
        key = ticket_name(ticket)  # hipErrorInvalidValue for a malformed one, as in the store
        try:
            os.close(fdserver.fetch(route.pid, route.start, handle.uid, key, 1.0))
        except (HipError, OSError):
            pass  # consumed already, or its exporter is gone: nothing held
