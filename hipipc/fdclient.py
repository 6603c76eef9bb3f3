"""The descriptor server's wire protocol and its client, the importer's side of the
SCM_RIGHTS fallback (:mod:`hipipc.fdserver` is the exporter's side and re-exports
:func:`fetch` and :func:`socket_name`).

Protocol: the server of process (uid, pid, start time) listens on the abstract ``AF_UNIX``
``SOCK_SEQPACKET`` address :func:`socket_name`.  A request is one fixed 44-byte message, a
magic and the 40-hex key; the reply is one message, a status, the offer's share mode and the
file's gid (:data:`_REPLY`), with the descriptor attached when granted.

Client: :func:`fetch` connects, checks the server's ``SO_PEERCRED`` (so a squatter on the
name is refused, and named), sends the key and receives the descriptor close-on-exec.  A
server that stalls or answers garbage cannot hang :func:`fetch` (its timeout bounds the whole
call) or leak descriptors into it; callers still check the inode and identity.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import time

from .errors import HipError, hipError_t
from .segment import process_start_time
from .store import _os_call
from .timeouts import deadline, expired, remaining
from .transport import recv_fds

__all__ = ["fetch", "socket_name"]

_PREFIX = "hipipc.fd"
_MAGIC = b"hfd1"
_KEY_LEN = 40
_REQUEST_LEN = len(_MAGIC) + _KEY_LEN
_REPLY = struct.Struct("<BHI")  # status, the offer's share mode, the file's gid
_OK, _ABSENT, _REFUSED, _BAD = 0, 1, 2, 3
_PID_MAX = 4194304  # PID_MAX_LIMIT
_UID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel: never a real uid
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0x4000)
_CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_KEY_RE = re.compile(r"[0-9a-f]{40}")


def socket_name(uid: int, pid: int, start: int) -> bytes:
    """The abstract socket address of the descriptor server of process (pid, start) of uid.

    Abstract names live in the network namespace, not in any file system: nothing to clean
    up, visible in ``/proc/net/unix``, bindable by anyone (hence the checks on both sides).
    """
    return f"\0{_PREFIX}.{uid}.{pid}.{start}".encode()


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _refused(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidResourceHandle, detail)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise _invalid(f"an fd server key is a 40-digit lowercase hex digest, not {key!r:.60}")
    return key


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _check_route(pid: object, start: object, uid: object) -> None:
    for what, value, low, high in (
        ("pid", pid, 1, _PID_MAX),
        ("start", start, 1, 2**64 - 1),
        ("uid", uid, 0, _UID_MAX),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _invalid(f"fetch: {what} must be an int in [{low}, {high}], not {value!r}")


def _connect(sock: socket.socket, name: bytes, end: float | None, who: str) -> None:
    delay = 0.0005
    while True:
        try:
            sock.connect(name)
            return
        except (BlockingIOError, InterruptedError):
            pass  # EAGAIN: the server's backlog is full (a flood): retry until the deadline
        except (ConnectionRefusedError, FileNotFoundError):
            raise _refused(
                f"{who} serves no descriptors: it exited (which revokes its handles), or it "
                "runs in another network namespace (the fd transport's fallback needs the "
                "same one)"
            ) from None
        except OSError as exc:
            raise _refused(f"cannot reach the fd server of {who}: {exc.strerror}") from None
        if expired(end):
            raise _refused(f"the fd server of {who} is too busy to accept a connection")
        left = remaining(end)
        time.sleep(delay if left is None else min(delay, left))
        delay = min(delay * 2, 0.02)


def _check_peer(sock: socket.socket, pid: int, start: int, uid: int, who: str) -> None:
    """The server must be the exporter itself: anyone can bind an abstract name first."""
    ppid, puid, _pgid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if ppid != pid or puid != uid:
        raise _refused(
            f"the fd server name of {who} is held by pid {ppid} uid {puid}, not by the "
            "exporter (a squatter, or a pid namespace this process cannot see): refused; "
            "the exporter's pidfd_getfd route still works for its own user"
        )
    now = process_start_time(pid)
    if now is None or now not in (start, -1):
        raise _refused(f"{who} exited (its pid now names another process)")


def _reason(status: int, mode: int, gid: int, who: str) -> str:
    if status == _ABSENT:
        return (
            f"{who} no longer offers this handle: it was freed (revoked), or it was a "
            "send-and-drop ticket that was already used"
        )
    if status == _REFUSED:
        scope = {0o600: "its own user only", 0o660: f"its group (gid {gid}) only"}.get(
            mode, f"mode {mode:#o}"
        )
        return (
            f"{who} shares this handle with {scope}, not with this process (uid "
            f"{os.geteuid()}, gid {os.getegid()}): the exporter must set HIPIPC_SHARE=group "
            "(with this process in its group) or HIPIPC_SHARE=all, or pass share= at export"
        )
    if status == _BAD:
        return f"the fd server of {who} refused the request as malformed"
    return f"the fd server of {who} sent a malformed reply"


def fetch(pid: int, start: int, uid: int, key: str, timeout: float | None = 5.0) -> int:
    """The descriptor offered under ``key`` by the exporter (``pid``, ``start`` time, ``uid``),
    received close-on-exec; the caller owns it (and must still check its inode and the
    segment's identity: the server proved who it is, not what it sent).

    The exporter's server is refused unless its ``SO_PEERCRED`` says it is that pid and uid
    (and the pid still has that start time).  Raises ``hipErrorInvalidResourceHandle`` with
    the reason: the exporter is gone (or in another network namespace), a squatter holds its
    name, the key is not offered (freed, revoked, a used ticket), the exporter did not share
    it with this uid (the message names ``HIPIPC_SHARE``), the server did not answer within
    ``timeout`` seconds, or it answered garbage (every descriptor of a bad reply is closed).
    Raises ``hipErrorInvalidValue`` for bad arguments or timeout, ``hipErrorOutOfMemory`` when
    no descriptor is left for the socket.
    """
    _check_route(pid, start, uid)
    _check_key(key)
    end = deadline(timeout, "fetch timeout")
    who = f"the exporter (pid {pid}, uid {uid})"
    sock = _os_call("fetching a descriptor", socket.socket, socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.setblocking(False)
        _connect(sock, socket_name(uid, pid, start), end, who)
        _check_peer(sock, pid, start, uid, who)
        # A free descriptor for the reply, made sure of before asking (raising the soft limit
        # if need be): a descriptor the kernel cannot install is dropped, and a ticket's one
        # send would be lost.
        _close(_os_call("fetching a descriptor", os.dup, sock.fileno()))
        try:
            sock.send(_MAGIC + key.encode("ascii"), socket.MSG_DONTWAIT | _MSG_NOSIGNAL)
            data, fds = recv_fds(sock, 1, 64, remaining(end))
        except TimeoutError:
            raise _refused(f"the fd server of {who} did not answer within {timeout} s") from None
        except EOFError:
            raise _refused(f"the fd server of {who} closed without answering") from None
        except HipError:  # recv_fds: more than one descriptor (all closed), or truncated
            _close(_os_call("receiving a descriptor", os.dup, sock.fileno()))  # the limit?
            raise _refused(f"the fd server of {who} sent a malformed reply") from None
        except OSError as exc:
            raise _refused(f"the fd server of {who} failed: {exc.strerror}") from None
    finally:
        sock.close()
    try:
        if len(data) != _REPLY.size:
            raise _refused(_reason(-1, 0, 0, who))
        status, mode, gid = _REPLY.unpack(data)
        if status != _OK or len(fds) != 1:
            raise _refused(_reason(status if status != _OK else -1, mode, gid, who))
        if not stat.S_ISREG(os.fstat(fds[0]).st_mode):
            raise _refused(f"the fd server of {who} sent a descriptor that is not a memfd")
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return fds[0]
