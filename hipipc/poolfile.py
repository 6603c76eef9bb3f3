"""A memory pool's file (see :mod:`hipipc.poolcore` for the allocator): its layout, the
checks an importer makes on it, and the importers' leases.

Layout of the pool's memfd (all offsets page aligned)::

    page 0            header: magic, version, table capacity, device, file size, data
                      offset, the pool's 128-bit random identity
    pages 1..         the allocation table: one 32-byte entry per slot (offset, size,
                      serial, state), written only by the exporting process
    data offset..     the allocations, first fit with coalescing over ``maxSize`` bytes

An importer receives the memfd (``SCM_RIGHTS``) and :func:`check_pool_file` checks that it is
a regular file carrying :data:`hipipc.memfd.SEALS` (so no process can shrink it under the
mappings: no SIGBUS) and reads the header once.  Everything read from the file afterwards, the
table included, is hostile input: a process holding the descriptor can write any byte.

Leases: an importer reopens the pool file through ``/proc/self/fd`` (its own open file
description, :func:`_private_description`) and holds an OFD read lock on each range it imports
(:func:`_take_lease`), taken *before* it reads the table entry.  The exporter clears the
entry, then tests for a lock (:func:`_leased`) before it puts a freed range back in the free
list.  Either the exporter sees the lease or the importer sees the cleared entry.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct

from .errors import HipError, hipError_t
from .memfd import SEALS, seals_of
from .registry import get_registry
from .store import _os_call

PAGE = mmap.PAGESIZE
_MAGIC = b"hipipcMP"
_VERSION = 1
# magic, version, table capacity, device, file size, data offset, pool identity
_HEADER = struct.Struct("<8sIIQQQ16s")
_ENTRY = struct.Struct("<QQQQ")  # offset, size (bytes asked), serial, state
_LIVE = 1
CAPACITY = 16384  # live allocations per pool: the table is 512 KiB, committed at creation
_TABLE_OFFSET = PAGE
_DATA_OFFSET = _TABLE_OFFSET + -(-CAPACITY * _ENTRY.size // PAGE) * PAGE
# magic, version, slot, offset, size, serial, pool identity, 8 reserved bytes (zero)
_EXPORT = struct.Struct("<8sIIQQQ16s8s")
_EXPORT_MAGIC = b"hipipcPX"
EXPORT_SIZE = _EXPORT.size  # 64: hipMemPoolPtrExportData

# Importers' leases: an OFD read lock on each imported range, through the importer's own open
# file description of the pool; the exporter tests for them before it reuses a freed range.
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid

_WRITE_SEALS = 0x0008 | 0x0010  # F_SEAL_WRITE, F_SEAL_FUTURE_WRITE


def _invalid(detail: str) -> HipError:
    return HipError(hipError_t.hipErrorInvalidValue, detail)


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _lease(fd: int, off: int, length: int, kind: int) -> bool:
    """Take (F_RDLCK) or drop (F_UNLCK) the lease on ``[off, off+length)``; False if refused."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, 0, off, length, 0))
        return True
    except OSError:
        return False


def _take_lease(fd: int, off: int, length: int) -> None:
    """The importer's lease on ``[off, off+length)``, or an error: importing without it would
    let the exporter reuse the range under the importer's pointer, silently."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, 0, off, length, 0))
    except OSError as exc:
        if exc.errno == errno.ENOLCK:
            raise HipError(
                hipError_t.hipErrorOutOfMemory, "hipMemPoolImportPointer: no lock left for a lease"
            ) from exc
        raise _invalid(
            "hipMemPoolImportPointer: another holder of the pool's descriptor locks this range "
            f"({exc.strerror}; tampered?)"
        ) from exc


def _leased(fd: int, off: int, length: int) -> bool:
    """Whether another open file description (an importer) holds a lease on the range."""
    try:
        raw = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, off, length, 0))
    except OSError:
        return False
    kind: int = _FLOCK.unpack(raw)[0]  # struct flock's l_type, as the kernel answered
    return kind != fcntl.F_UNLCK


def _private_description(fd: int, st: os.stat_result) -> int:
    """A new open file description of the pool file (via /proc), to hold this importer's
    leases; -1 if /proc is not there or refuses (imports then hold no lease).  At the limit
    ``hipErrorOutOfMemory`` naming it: importing without a lease would let the exporter reuse
    the memory under this importer's pointers, silently."""
    try:
        mine = _os_call(
            "importing a memory pool", os.open, f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC
        )
    except OSError as exc:
        # No /proc mounted, or a /proc that refuses the reopen (a restricted container):
        # the documented no-lease mode, as before.  Only a full descriptor table is an error.
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
            return -1
        raise _invalid(f"cannot reopen the shareable handle: {exc.strerror}") from exc
    mst = os.fstat(mine)
    if (mst.st_dev, mst.st_ino) != (st.st_dev, st.st_ino):
        os.close(mine)
        raise _invalid("the shareable handle was closed or replaced during the import")
    return mine


def check_pool_file(fd: int) -> tuple[os.stat_result, int, int, bytes]:
    """Check that ``fd`` (another process's shareable handle, untrusted) is a hipipc pool file
    of this version and read its header once: ``(stat, device, file size, pool identity)``.
    ``hipErrorInvalidValue`` for anything else (not a descriptor, not a sealed read-write
    memfd, a bad or inconsistent header, a device this process lacks)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _invalid(f"the shareable handle {fd} is not an open descriptor") from exc
    seals = seals_of(fd)
    # Our seals, and no write seal: a file that refuses writable shared mappings is not
    # one of ours either (mmap would fail later with a less clear error).
    if not stat.S_ISREG(st.st_mode) or seals & SEALS != SEALS or seals & _WRITE_SEALS:
        raise _invalid(
            "the shareable handle is not a hipipc memory pool (not a sealed memfd from "
            "hipMemPoolExportToShareableHandle)"
        )
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        mode = -1
    if mode != os.O_RDWR:  # a reopened read-only copy: cannot be mapped shared-writable
        raise _invalid("the shareable handle is not open for reading and writing")
    try:
        raw = os.pread(fd, _HEADER.size, 0)
    except OSError as exc:
        raise _invalid(f"cannot read the pool header: {exc.strerror}") from exc
    if len(raw) != _HEADER.size:
        raise _invalid("the shareable handle's pool header is truncated")
    magic, version, capacity, device, size, data_off, pool_id = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _VERSION:
        raise _invalid("the shareable handle is not a hipipc memory pool of this version")
    if (
        capacity != CAPACITY
        or data_off != _DATA_OFFSET
        or size != st.st_size
        or size <= data_off
        or size % PAGE
    ):
        raise _invalid("the pool header is inconsistent with its file (tampered?)")
    count = get_registry().backend.device_count()
    if device >= count:  # hostile input too: its pointers would claim a missing device
        raise _invalid(f"the pool is on device {device}, which this process lacks ({count})")
    return st, device, size, pool_id
