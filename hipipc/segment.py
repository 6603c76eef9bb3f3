"""What a segment header says, and whether to believe it.

Every segment starts with a one-page header: its identity (everything the handle determines,
compared in constant time on import) and its exporter (pid, pid namespace, process start
time, creation time), which ``hipipc gc`` and the first export's sweep use to find orphans.
A grantee with write access (``HIPIPC_SHARE=group|all``) can write any bytes there, so every
exporter field is range-checked, and a header that cannot be trusted never declares its
segment dead (never unlink what might be live).
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import signal
import struct
import time
from dataclasses import dataclass

from .handle import HandleKind, IpcHandle

__all__ = [
    "SegmentInfo",
    "process_alive",
    "process_start_time",
    "own_process",
    "untrusted_reason",
    "exporter_gone",
]

# The header is the segment's identity (everything the handle determines: magic, version,
# kind, verifier, size, device, uid), then its exporter (pid, pid namespace, start time,
# created).
_IDENTITY = struct.Struct("<8sII32sQII")
_EXPORTER = struct.Struct("<IIQd")
_HEADER_SIZE = _IDENTITY.size + _EXPORTER.size
_HEADER_MAGIC = b"hipipcSG"
_HEADER_VERSION = 1


def _identity(handle: IpcHandle) -> bytes:
    return _IDENTITY.pack(
        _HEADER_MAGIC,
        _HEADER_VERSION,
        int(handle.kind),
        handle.verifier,
        handle.size,
        handle.device,
        handle.uid,
    )


# Header values a live exporter can have written (a grantee with write access may write any).
_PID_LIMIT = 1 << 31  # pid 0 and pids >= 2**31 are not processes (kill(2) takes an int)
_START_LIMIT = 1 << 63
_FUTURE_SLACK = 86400.0  # seconds a creation time may lie ahead of this clock


@dataclass(frozen=True)
class SegmentInfo:
    """The parsed header of a segment."""

    kind: HandleKind
    size: int
    device: int
    uid: int
    pid: int
    start_time: int
    created: float
    verifier: bytes
    pid_namespace: int = 0
    # Why the exporter fields cannot be trusted (out of range: written by someone else), or
    # None.  Such a segment is never "dead" by its own word: gc and the sweep skip it.
    problem: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> SegmentInfo | None:
        """The header in ``raw`` (untrusted bytes), or None if it is not a segment header.

        Every exporter field is range-checked; an impossible value sets :attr:`problem`
        rather than raising, so no byte pattern makes ``hipipc ls/gc`` or a sweep fail.
        """
        if len(raw) < _HEADER_SIZE:
            return None
        magic, version, kind, verifier, size, device, uid = _IDENTITY.unpack_from(raw)
        pid, pidns, start, created = _EXPORTER.unpack_from(raw, _IDENTITY.size)
        if magic != _HEADER_MAGIC or version != _HEADER_VERSION:
            return None
        try:
            kind = HandleKind(kind)
        except ValueError:
            return None
        problem = None
        if not 0 < pid < _PID_LIMIT:
            problem = f"exporter pid {pid} is not a process id"
        elif not 0 <= start < _START_LIMIT:
            problem = f"exporter start time {start} is out of range"
        elif not (math.isfinite(created) and 0 <= created <= time.time() + _FUTURE_SLACK):
            problem = f"creation time {created!r} is not a plausible time"
        if problem is not None:
            pid, start, created = 0, 0, 0.0
        return cls(kind, size, device, uid, pid, start, created, verifier, pidns, problem)

    def exporter_alive(self) -> bool:
        """Whether the exporting process still runs (pid plus start time: safe against reuse).

        True for a header whose exporter fields cannot be trusted (:attr:`problem`): what
        might be live is never declared dead.
        """
        if self.problem is not None:
            return True
        return process_alive(self.pid, self.start_time, self.pid_namespace)


def process_alive(pid: int, start_time: int, pid_namespace: int) -> bool:
    """Whether process (pid, start time) of ``pid_namespace`` still runs.

    Errs towards "alive" where it cannot tell: a process of another pid namespace (containers
    sharing /dev/shm) or one that /proc hides (hidepid).  A reused pid has another start time.
    """
    if pid_namespace and pid_namespace != own_process()[2]:
        return True
    now = process_start_time(pid)
    return now is not None and now in (-1, start_time)


def proc_stat_fields(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` from field 3 (the state) on; OSError if unreadable.

    Field 2 (comm) may contain spaces and parentheses, so fields resume after the last ')'.
    """
    # os.open/os.read, not open(): no buffered file object (the first open() of a process
    # costs tens of microseconds, and liveness asks on a first import).  The line is far
    # below 4096 bytes (52 numeric fields and a 16-byte name).
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it is not running.

    A zombie (killed or exited, not yet reaped by its parent) counts as not running: it keeps
    its pid and start time in /proc but can never run again, so its segments are orphans.
    Only a zombie *thread-group leader with no other threads* is one: a main thread that
    called ``pthread_exit`` shows ``Z`` too while the process's other threads still run (and
    still map its exports).
    """
    try:
        fields = proc_stat_fields(pid)
    except FileNotFoundError:
        # hidepid=2 hides other users' processes entirely; signal 0 still tells they exist.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            return -1
        return -1
    except OSError:
        # /proc mounted with hidepid=1: we cannot tell, so treat the process as alive.
        return -1
    # Field 3, the state: zombie or dead; field 20, the process's thread count (1 for a
    # real zombie, more while threads outlive a main thread that exited).
    if fields[0] in (b"Z", b"X") and int(fields[17]) <= 1:
        return None
    return int(fields[19])


_own_start: tuple[int, int, int] | None = None


def own_process() -> tuple[int, int, int]:
    """This process's (pid, start time, pid namespace inode): what segment headers and event
    records name, so that liveness checks survive pid reuse and tell namespaces apart."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        try:
            pidns = os.stat("/proc/self/ns/pid").st_ino & 0xFFFFFFFF
        except OSError:
            pidns = 0
        own = (pid, max(process_start_time(pid) or 0, 0), pidns)
        if own[1] <= 0:  # unread (no descriptor left to open /proc/self/stat): ask again
            return own
        _own_start = own
    return _own_start


# Known from import on (two reads of /proc, a few microseconds): the first open or export of
# the process then does not pay for them (issue 15's cold path).  Recomputed after fork.
own_process()


def untrusted_reason(info: SegmentInfo, st: os.stat_result) -> str | None:
    """Why the header ``info`` of the segment with ``st`` cannot be trusted, or None."""
    if info.problem is not None:
        return info.problem
    if info.uid != st.st_uid:
        return f"header names uid {info.uid} but the file belongs to uid {st.st_uid}"
    return None


def exporter_gone(
    info: SegmentInfo,
    st: os.stat_result,
    cache: list[set[tuple[int, int]]] | None = None,
    fd: int | None = None,
) -> bool:
    """Whether the segment (header ``info``, stat ``st``) is an orphan gc may remove.

    Never for an untrusted header.  A header others may write (group/other write bits) is
    believed only if no other process holds the file: its "my exporter is dead" might be a
    grantee's forgery, and a live exporter maps its segment.  With ``fd`` (a descriptor of
    the segment) the kernel says so (:func:`_held_elsewhere`), for every process, even one
    whose /proc maps are hidden (not dumpable: one that dropped privileges); otherwise, or
    where the kernel cannot tell, no process whose maps we can read may map it.  ``cache``
    (a list holding at most one set) keeps that scan of /proc to once per sweep.
    """
    if untrusted_reason(info, st) is not None or info.exporter_alive():
        return False
    if st.st_mode & 0o022:
        held = None if fd is None else _held_elsewhere(fd)
        if held is not None:
            return not held
        if cache is None:
            cache = []
        if not cache:
            cache.append(_mapped_files())
        return (st.st_dev, st.st_ino) not in cache[0]
    return True


_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)


def _held_elsewhere(fd: int) -> bool | None:
    """Whether another open file description (a descriptor or a mapping, of any process)
    holds the file behind ``fd``; None where the kernel will not tell (leases disabled, not
    the file's owner).

    A write lease is granted only to the sole holder of a file, so trying one asks exactly
    that; it is released at once.  A process that opens the file meanwhile breaks the lease,
    which signals the holder: SIGURG (ignored by default) instead of SIGIO (fatal).
    """
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # closing the descriptor ends the lease too
    return False


def _mapped_files() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file mapped by a process whose /proc maps we may read."""
    found: set[tuple[int, int]] = set()
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    # address perms offset major:minor inode [path]
                    fields = line.split(None, 5)
                    if len(fields) >= 5 and fields[4] != b"0":
                        major, _, minor = fields[3].partition(b":")
                        found.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
        except (OSError, ValueError):
            continue
    return found
