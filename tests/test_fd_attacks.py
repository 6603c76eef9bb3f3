"""Adversarial review of the fd transport (issue 13): hostile handles, races, fork, limits.

Each test is an attack written before its fix (or one that held): a handle whose route names
a descriptor that is not a hipipc segment, a stale handle whose descriptor number was reused,
a forked child's exit, the first open of a process at the descriptor limit.  Real processes,
every wait bounded; no mock of the thing under test.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time

import pytest

import hipipc as hip
from hipipc.errors import hipError_t as E
from hipipc.fdtransport import fd_route_supported
from hipipc.handle import FdRoute, HandleKind
from hipipc.memfd import F_ADD_SEALS, F_SEAL_WRITE, SEALS
from hipipc.segment import _EXPORTER, _identity, own_process
from hipipc.store import PAGE_SIZE

pytestmark = pytest.mark.skipif(not fd_route_supported(), reason="no fd transport here")

FD_ENV = {"HIPIPC_TRANSPORT": "fd"}
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _forge(fd: int, size: int = 4096, header: bool = True) -> bytes:
    """A handle whose route names this process's descriptor ``fd`` (the importer's own: the
    hostile peer picked its number and inode); its identity written into ``fd`` if asked."""
    pid, start, pidns = own_process()
    route = FdRoute(pid, start, fd, os.fstat(fd).st_ino)
    handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, size, 0, os.geteuid(), route)
    if header:
        os.pwrite(fd, _identity(handle) + _EXPORTER.pack(pid, pidns, start, time.time()), 0)
    return bytes(handle)


def _memfd(size: int, seals: int | None = SEALS) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def _seal(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


def _open_error(raw: bytes) -> hip.HipError:
    before = _fd_count()
    with pytest.raises(hip.HipError) as exc:
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)  # pragma: no cover - only if the test fails
    assert _fd_count() == before, "a refused open leaked a descriptor"
    return exc.value


@pytest.fixture
def warm_pidfd():
    """One open of a route to this process first, so its pidfd is cached before counting."""
    fd = _memfd(PAGE_SIZE + 4096)
    try:
        raw = _forge(fd)
        _seal(fd, SEALS)
        ptr = hip.hipIpcOpenMemHandle(raw)  # the control: a forged but well-made segment opens
        hip.hipIpcCloseMemHandle(ptr)
    finally:
        os.close(fd)


def _kinds_of_files():
    """(what, descriptor) of files a hostile route may name in the importer."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    tmp = tempfile.TemporaryFile()
    tmp.truncate(PAGE_SIZE + 4096)
    keep = [a, b, tmp]
    return [("pipe", r), ("socket", a.fileno()), ("/dev/zero", zero), ("file", tmp.fileno())], [
        r,
        w,
        zero,
    ], keep


def test_routes_naming_the_importers_own_files_that_are_no_segment_are_refused(warm_pidfd):
    named, fds, keep = _kinds_of_files()
    try:
        for what, fd in named:
            raw = _forge(fd, header=False)
            err = _open_error(raw)
            assert err.code == E.hipErrorInvalidResourceHandle, (what, err)
            assert "stale" in str(err), (what, err)
    finally:
        for fd in fds:
            os.close(fd)
        for obj in keep:
            obj.close()


@pytest.mark.parametrize(
    "case",
    ["unsealed", "seal-write", "seal-future-write", "too-small", "forged-header"],
)
def test_hostile_memfds_of_the_right_inode_are_refused_before_mapping(warm_pidfd, case):
    size = 4096
    fd = _memfd(PAGE_SIZE + (size if case != "too-small" else 0))
    try:
        raw = _forge(fd, size)
        if case == "forged-header":
            os.pwrite(fd, os.urandom(64), 0)
        if case == "seal-write":
            _seal(fd, SEALS | F_SEAL_WRITE)
        elif case == "seal-future-write":
            _seal(fd, SEALS | F_SEAL_FUTURE_WRITE)
        elif case != "unsealed":
            _seal(fd, SEALS)
        err = _open_error(raw)
        assert err.code == E.hipErrorInvalidResourceHandle, (case, err)
    finally:
        os.close(fd)


def test_routes_to_pid_1_are_refused():
    from hipipc.segment import process_start_time

    start = process_start_time(1)
    fd = _memfd(PAGE_SIZE + 4096)
    try:
        raw = bytearray(_forge(fd))
        for start_1 in {start if start and start > 0 else 1, 12345}:
            raw[40:] = FdRoute(1, start_1, 0, os.fstat(fd).st_ino).pack()
            with pytest.raises(hip.HipError):  # may cache a pidfd of pid 1: counted after
                hip.hipIpcOpenMemHandle(bytes(raw))
            err = _open_error(bytes(raw))
            assert err.code == E.hipErrorInvalidResourceHandle, err
    finally:
        os.close(fd)
