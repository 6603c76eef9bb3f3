"""The SCM_RIGHTS fallback of the fd transport: a per-process descriptor server (issue 13).

An fd-mode handle names a memfd by (exporter pid, start time, fd number, inode); importers
take it with ``pidfd_getfd``, whose ptrace check is the uid boundary.  Where the kernel
refuses that (another uid granted with ``HIPIPC_SHARE``, a non-dumpable exporter, Yama,
seccomp), the importer asks the exporter's descriptor server instead: this module.

Exporter side: :func:`offer` makes a file available under a key (a 40-hex one-way digest: the
handle's ``segment_name``, or a ticket's name), :func:`withdraw` revokes it, :func:`pending`
says whether it is still offered, :func:`withdraw_all` is the exit rule.  The first offer
starts one daemon thread that serves an abstract ``AF_UNIX`` ``SOCK_SEQPACKET`` socket named
from (uid, pid, start time) (:func:`socket_name`).  Per request it checks the client's
``SO_PEERCRED`` against the offer's share mode (same uid or root; ``0o660``: the client's
groups hold the file's gid; ``0o666``: anyone) and answers with one message: a status and,
when granted, the descriptor.  Importer side: :func:`fetch` (in :mod:`hipipc.fdclient`, with
the wire protocol; importable from here) connects, checks the server's ``SO_PEERCRED`` (so a
squatter on the name is refused), sends the key and receives the descriptor close-on-exec.

Hostile peers: every client has a deadline and one request; connections are capped (the
oldest is dropped); a request is a fixed 44-byte frame read without an ancillary buffer (a
client's descriptors are never installed here); replies never block and never raise SIGPIPE.
A server that stalls or answers garbage cannot hang :func:`fetch` (its timeout bounds the
whole call) or leak descriptors into it; callers still check the inode and identity.

Squatting: an abstract name has no owner, so any local process may bind an exporter's name
first.  :func:`offer` still succeeds (keys are recorded; ``pidfd_getfd`` importers are not
affected), warns once, and retries the bind at every later offer; :func:`fetch` refuses the
squatter by its credentials and names it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import warnings
from typing import NamedTuple

from .errors import HipError, hipError_t

# The wire protocol and the importer's side (fetch) live in fdclient; fetch and socket_name
# stay importable from here, as before the split (fdtransport calls fdserver.fetch).
from .fdclient import (
    _ABSENT,
    _BAD,
    _CRED,
    _KEY_RE,
    _MAGIC,
    _MSG_NOSIGNAL,
    _OK,
    _REFUSED,
    _REPLY,
    _REQUEST_LEN,
    _check_key,
    _close,
    _invalid,
    fetch,
    socket_name,
)
from .segment import own_process
from .store import _os_call, raise_fd_limit
from .transport import send_fds

__all__ = ["offer", "withdraw", "pending", "withdraw_all", "fetch"]

_SHARE_MODES = (0o600, 0o660, 0o666)
_CLIENT_SECONDS = 3.0  # a client must send its request within this after connecting
_MAX_CLIENTS = 128  # open client connections; past it the oldest is dropped
_ACCEPT_BATCH = 16  # accepts per loop turn: a flood cannot evict a client before it is read
_EMFILE_PAUSE = 0.05  # seconds the listener rests when no descriptor is left to accept with
_STOP_JOIN = 2.0  # seconds withdraw_all waits for the server thread
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


class _Offer(NamedTuple):
    file: tuple[int, int]  # (st_dev, st_ino)
    mode: int
    once: bool
    gid: int  # the file's group, for the 0o660 policy
    fd: int  # an export's borrowed descriptor; -1 for a once-key (the file's own reference)


class _File:
    """The server's own reference to one file, shared by the once-keys that name it."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd, self.refs = fd, 0


class _State:
    """The offer table and the server of this process (a forked child gets a fresh one)."""

    def __init__(self) -> None:
        # Reentrant: a DeviceBuffer that the garbage collector frees inside a critical section
        # (any allocation may run a collection, in any thread) withdraws its key from within.
        self.lock = threading.RLock()
        self.offers: dict[str, _Offer] = {}
        self.files: dict[tuple[int, int], _File] = {}
        self.server: _Server | None = None
        self.warned = False  # about a squatter on our name

    def drop(self, key: str) -> None:
        """Remove ``key`` (under the lock); the file's own reference goes with its last
        once-key."""
        entry = self.offers.pop(key, None)
        if entry is None or not entry.once:
            return
        held = self.files.get(entry.file)
        if held is not None:
            held.refs -= 1
            if held.refs <= 0:
                del self.files[entry.file]
                _close(held.fd)


_state = _State()


# -- the server ----------------------------------------------------------------------------


class _Server:
    """One listening socket and the daemon thread that serves it."""

    def __init__(self, state: _State, listener: socket.socket) -> None:
        self.state = state
        self.listener = listener
        self.wake_r, self.wake_w = _os_call(
            "starting the fd server", socket.socketpair, socket.AF_UNIX, socket.SOCK_STREAM
        )
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        # Insertion ordered, so the first entry is the oldest: (socket, deadline).
        self.clients: dict[int, tuple[socket.socket, float]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="hipipc-fdserver", daemon=True)

    # The thread never dies of a peer's doing: each connection's errors close that connection.
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug here must not print from a daemon thread at exit
            pass
        finally:
            self.close_all()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        poller.register(self.listener, select.POLLIN)
        listener_fd, wake_fd = self.listener.fileno(), self.wake_r.fileno()
        resting_until = 0.0
        while not self.stopping:
            now = time.monotonic()
            # The oldest client expires first (insertion order, one constant deadline).
            waits = [next(iter(self.clients.values()))[1]] if self.clients else []
            if resting_until:
                waits.append(resting_until)
            timeout = None if not waits else max(0, int((min(waits) - now) * 1000) + 1)
            accept = False
            for fd, _events in poller.poll(timeout):
                if fd == wake_fd:
                    self._drain_wake()
                elif fd == listener_fd:
                    accept = True
                elif fd in self.clients:
                    self._serve(poller, fd)
            if self.stopping:
                return
            now = time.monotonic()
            if resting_until and now >= resting_until:
                resting_until = 0.0
                poller.modify(self.listener, select.POLLIN)
            if accept and not self._accept(poller, now):
                # No descriptor to accept with: rest the listener, or it polls ready forever.
                resting_until = now + _EMFILE_PAUSE
                poller.modify(self.listener, 0)
            while self.clients:  # drop clients past their deadline, oldest first
                fd, (conn, end) = next(iter(self.clients.items()))
                if end > now:
                    break
                self._drop_client(poller, fd)

    def _drain_wake(self) -> None:
        try:
            self.wake_r.recv(4096)
        except OSError:
            pass

    def _accept(self, poller: select.poll, now: float) -> bool:
        """Accept up to a batch; False when out of descriptors and nothing could be freed."""
        fresh = 0  # accepted in this batch: the newest entries, not yet polled for a request
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = self.listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    if raise_fd_limit():
                        continue
                    if len(self.clients) > fresh:
                        # Out of descriptors: give up the oldest waiting client's, never one
                        # accepted in this batch (it has not had its turn to be read yet).
                        self._drop_client(poller, next(iter(self.clients)))
                        continue
                    return fresh > 0  # rest only when there was nothing to drop
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                return True
            conn.setblocking(False)
            if len(self.clients) >= _MAX_CLIENTS:
                self._drop_client(poller, next(iter(self.clients)))
            self.clients[conn.fileno()] = (conn, now + _CLIENT_SECONDS)
            poller.register(conn, select.POLLIN)
            fresh += 1
        return True

    def _drop_client(self, poller: select.poll, fd: int) -> socket.socket:
        conn, _end = self.clients.pop(fd)
        try:
            poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        conn.close()
        return conn

    def _serve(self, poller: select.poll, fd: int) -> None:
        conn = self.clients[fd][0]
        try:
            self._answer(conn)
        except Exception:  # a client that vanished mid-reply, a bug: that client only
            pass
        finally:
            self._drop_client(poller, fd)

    def _answer(self, conn: socket.socket) -> None:
        # No ancillary buffer: descriptors a client sends are discarded by the kernel
        # (MSG_CTRUNC), never installed in this process.
        try:
            data, _anc, flags, _addr = conn.recvmsg(_REQUEST_LEN + 1)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return  # closed without a request
        if flags & socket.MSG_TRUNC or len(data) != _REQUEST_LEN or data[:4] != _MAGIC:
            _reply(conn, _BAD)
            return
        try:
            key = data[4:].decode("ascii")
        except UnicodeDecodeError:
            _reply(conn, _BAD)
            return
        if not _KEY_RE.fullmatch(key):
            _reply(conn, _BAD)
            return
        pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        state = self.state
        # The lock is held across one non-blocking send: withdraw (which the exporter calls
        # before closing a borrowed descriptor) cannot close it mid-send.
        with state.lock:
            entry = state.offers.get(key)
            fd = _usable(state, key, entry)
            if entry is None or fd < 0:
                _reply(conn, _ABSENT)
                return
            if not _allowed(conn, entry.mode, entry.gid, pid, uid, gid):
                _reply(conn, _REFUSED, entry.mode, entry.gid)
                return
            send_fds(conn, [fd], _REPLY.pack(_OK, entry.mode, entry.gid), timeout=0)
            if entry.once:
                state.drop(key)

    def stop(self) -> None:
        """Stop serving and close the socket; bounded, never raises."""
        self.stopping = True
        try:
            self.wake_w.send(b"x", _MSG_NOSIGNAL)
        except OSError:
            pass
        if (
            threading.current_thread() is not self.thread
            and self.thread.is_alive()
            and not sys.is_finalizing()  # daemon threads are frozen then: no join
        ):
            self.thread.join(_STOP_JOIN)
        self.close_all()

    def close_all(self) -> None:
        """Close every socket of the server: close only, never ``shutdown`` (in a forked child
        these are copies of the parent's, and shutdown would act on the parent's sockets).
        Idempotent; socket objects turn a use after close into EBADF, never another file."""
        for conn, _end in list(self.clients.values()):
            conn.close()
        self.clients.clear()
        for s in (self.listener, self.wake_r, self.wake_w):
            s.close()


def _usable(state: _State, key: str, entry: _Offer | None) -> int:
    """The descriptor to send for ``entry`` (under the lock), or -1.  A borrowed one must
    still be the offered file: an exporter that closed it without withdrawing (its number
    may name another file now) gets its key dropped, never another file sent."""
    if entry is None:
        return -1
    if entry.once:
        held = state.files.get(entry.file)
        return held.fd if held is not None else -1
    try:
        st = os.fstat(entry.fd)
        if (st.st_dev, st.st_ino) == entry.file:
            return entry.fd
    except OSError:
        pass
    state.drop(key)
    return -1


def _reply(conn: socket.socket, status: int, mode: int = 0, gid: int = 0) -> None:
    try:
        conn.send(_REPLY.pack(status, mode, gid), socket.MSG_DONTWAIT | _MSG_NOSIGNAL)
    except OSError:
        pass  # the client left: nothing to tell


def _allowed(conn: socket.socket, mode: int, file_gid: int, pid: int, uid: int, gid: int) -> bool:
    """The share policy: the store's file modes, applied to the client's credentials."""
    if uid == os.geteuid() or uid == 0:
        return True
    if mode == 0o666:
        return True
    if mode == 0o660:
        return gid == file_gid or file_gid in _peer_groups(conn, pid, uid)
    return False


def _peer_groups(conn: socket.socket, pid: int, uid: int) -> set[int]:
    """The client's supplementary groups as of its connect (SO_PEERGROUPS, Linux 4.13+);
    else from /proc/<pid>/status, believed only while that pid still has the client's uid."""
    size = 4 * 1024
    for _ in range(2):
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size = 4 * 65536  # NGROUPS_MAX
                continue
            break
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return set()
    groups: set[int] = set()
    uid_ok = False
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            uid_ok = len(fields) > 2 and fields[2] == str(uid).encode()
        elif line.startswith(b"Groups:"):
            groups = {int(g) for g in line.split()[1:] if g.isdigit()}
    return groups if uid_ok else set()


def _squatter(name: bytes) -> str:
    """Who holds ``name`` (for the exporter's warning): 'pid P uid U', or 'unknown'."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.setblocking(False)
            probe.connect(name)
            pid, uid, _ = _CRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"pid {pid} uid {uid}"
    except OSError:
        return "an unknown process"


def _start_server(state: _State) -> None:
    """Bind, listen and start the thread (under ``state.lock``).  A squatter leaves the
    server down (a warning, once); anything else that fails undoes its own steps."""
    listener = _os_call(
        "starting the fd server", socket.socket, socket.AF_UNIX, socket.SOCK_SEQPACKET
    )
    server = None
    try:
        # After the socket: at the fd limit, the socket's _os_call raised the soft limit, so
        # reading /proc/self/stat for the start time cannot fail for want of a descriptor.
        pid, start, _ns = own_process()
        if start <= 0:
            raise HipError(
                hipError_t.hipErrorOperatingSystem,
                "cannot start the fd server: this process's start time is unknown "
                "(/proc/self/stat unreadable)",
            )
        name = socket_name(os.geteuid(), pid, start)
        listener.setblocking(False)
        try:
            listener.bind(name)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise HipError(
                    hipError_t.hipErrorOperatingSystem, f"cannot bind the fd server: {exc}"
                ) from None
            listener.close()
            if not state.warned:
                state.warned = True
                with contextlib.suppress(Warning):  # "error" filters: the offer still stands
                    warnings.warn(
                        f"hipipc: the fd server's socket name {name[1:].decode()!r} is held by "
                        f"{_squatter(name)}; importers that need the SCM_RIGHTS fallback (other "
                        "users, or when pidfd_getfd is refused) are refused until it is free",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return
        listener.listen(socket.SOMAXCONN)
        server = _Server(state, listener)
        try:
            server.thread.start()
        except RuntimeError as exc:  # "can't create new thread at interpreter shutdown"
            raise HipError(
                hipError_t.hipErrorDeinitialized,
                f"cannot start the fd server: {exc}; export before the interpreter exits",
            ) from None
    except BaseException:
        if server is not None:
            server.close_all()
        listener.close()
        raise
    state.server = server


def _in_server_thread() -> bool:
    """Whether the caller is this process's server thread (a finalizer run there by the
    garbage collector, possibly between the check of a borrowed descriptor and its send)."""
    server = _state.server
    return server is not None and threading.current_thread() is server.thread


# -- the exporter's API --------------------------------------------------------------------


def offer(key: str, fd: int, share_mode: int, *, once: bool = False) -> None:
    """Make the file behind ``fd`` available under ``key`` to :func:`fetch`.

    ``key`` is a 40-hex one-way digest (a handle's ``segment_name``, or
    ``hipipc.store.ticket_name(secret)``).  ``share_mode`` is 0o600, 0o660 or 0o666
    (:func:`hipipc.store.share_mode`): who may fetch besides this uid and root (0o660: a
    process whose groups hold the file's gid; 0o666: anyone).  Offering a key again replaces
    its file and policy.

    References: an export (``once=False``) borrows ``fd``, so that an export costs one
    descriptor (issue 13's scale rule): the caller must :func:`withdraw` the key before it
    closes ``fd`` (``hipFree``: withdraw, then close).  Each send first checks that ``fd``
    still is the offered file, so a caller that closes first gets its key dropped, never
    another file sent.  ``once=True`` (a send-and-drop ticket): the server takes its own
    reference (one ``dup`` per distinct file, shared by its once-keys, closed with the last),
    so the ticket outlives the caller's close; the key is removed after its first
    successful send.

    The first offer starts the server thread; if another process holds the socket name, the
    offer is still recorded (see the module's notes on squatting).

    Raises ``hipErrorInvalidValue`` for a bad key, mode or descriptor (not open, not a
    regular file), ``hipErrorOutOfMemory`` naming the limit when no descriptor is left (after
    raising the soft ``RLIMIT_NOFILE``), ``hipErrorDeinitialized`` while the interpreter exits.
    """
    _check_key(key)
    if (
        isinstance(share_mode, bool)
        or not isinstance(share_mode, int)
        or share_mode not in _SHARE_MODES
    ):
        raise _invalid(f"share_mode must be 0o600, 0o660 or 0o666, not {share_mode!r}")
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise _invalid(f"offer needs an open descriptor, not {fd!r}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _invalid(f"offer: descriptor {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _invalid(f"offer: descriptor {fd} is not a regular file (a memfd)")
    ident = (st.st_dev, st.st_ino)
    once = bool(once)
    state = _state
    with state.lock:
        server = state.server
        if server is None or not server.thread.is_alive():
            if server is not None:
                server.close_all()
                state.server = None
            _start_server(state)
        if not once:  # borrowed: no descriptor of its own (one per export, issue 13)
            state.drop(key)
            state.offers[key] = _Offer(ident, share_mode, False, st.st_gid, fd)
            return
        old = state.offers.get(key)
        if old is not None and old.once and old.file == ident:
            state.offers[key] = old._replace(mode=share_mode, gid=st.st_gid)
            return
        held = state.files.get(ident)
        if held is None:
            # Close-on-exec like every descriptor Python makes; EMFILE raises the soft limit.
            held = _File(_os_call("offering a descriptor to the fd server", os.dup, fd))
            state.files[ident] = held
        held.refs += 1
        state.drop(key)
        state.offers[key] = _Offer(ident, share_mode, True, st.st_gid, -1)


def withdraw(key: str) -> None:
    """Revoke ``key``: later fetches are refused.  An unknown key is a no-op.

    Raises ``hipErrorInvalidValue`` for a malformed key."""
    _check_key(key)
    state = _state
    with state.lock:
        state.drop(key)


def pending(key: str) -> bool:
    """Whether ``key`` is still offered (a once-key until its first send: the exit rule's
    ticket wait).  Raises ``hipErrorInvalidValue`` for a malformed key."""
    return _check_key(key) in _state.offers


def withdraw_all() -> None:
    """The exit rule: withdraw every key, close the server's references, stop the thread and
    close its socket (the name is free again; a later :func:`offer` starts a new server).

    Never raises; bounded (the thread is joined for at most a few seconds, not at all while
    the interpreter finalizes)."""
    state = _state
    with state.lock:
        held = list(state.files.values())
        state.offers.clear()
        state.files.clear()
        server, state.server = state.server, None
        for f in held:
            _close(f.fd)
    if server is not None:
        try:
            server.stop()
        except Exception:
            pass


def _after_fork_in_child() -> None:
    """A forked child starts with no offers and no server.  It closes its inherited copies
    (the listening socket, the references, client sockets) without acting on the parent's:
    close only.  Each step is separate so that one failure cannot stop the rest."""
    global _state
    old, _state = _state, _State()
    for f in list(old.files.values()):
        _close(f.fd)
    server = old.server
    if server is not None:
        try:
            server.close_all()
        except Exception:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
