"""Memory pools (hipipc.mempool): every call's normal case and HIP's codes for misuse, pools
and pointers shared with real processes over SCM_RIGHTS, hostile export data and pool files,
lifetimes, descriptors; and send_fds/recv_fds themselves."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _proc import child_env, in_fork, run_python

import hipipc as hip
from hipipc import poolcore

E = hip.hipError_t
A = hip.hipMemPoolAttr
PFD = hip.hipMemHandleTypePosixFileDescriptor
MiB = 1 << 20
TIMEOUT = 60


def code_of(fn, *args, **kwargs) -> E:
    with pytest.raises(hip.HipError) as info:
        fn(*args, **kwargs)
    return info.value.code


def props(handles=PFD, device=0, max_size=0, **kw) -> hip.hipMemPoolProps:
    return hip.hipMemPoolProps(
        allocType=hip.hipMemAllocationTypePinned,
        handleTypes=handles,
        location=hip.hipMemLocation(hip.hipMemLocationTypeDevice, device),
        maxSize=max_size,
        **kw,
    )


@pytest.fixture
def pools():
    """``pools(props) -> pool``; every pool made is destroyed at teardown (if not already)."""
    made: list[hip.hipMemPool_t] = []

    def new(p=None) -> hip.hipMemPool_t:
        made.append(hip.hipMemPoolCreate(p or props()))
        return made[-1]

    yield new
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    for pool in made:
        if not pool.destroyed:
            hip.hipMemPoolDestroy(pool)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# -- a child process that receives a pool over a socket ------------------------------------

CHILD = """
import os, socket, sys, json
import numpy as np
import hipipc as hip
sock = socket.socket(fileno=int(sys.argv[1]))
data, fds = hip.recv_fds(sock, maxfds=1, bufsize=4096, timeout=60)
pool = hip.hipMemPoolImportFromShareableHandle(fds[0], hip.hipMemHandleTypePosixFileDescriptor, 0)
os.close(fds[0])
def reply(obj):
    sock.sendall((json.dumps(obj) + "\\n").encode())
def wait():
    assert sock.recv(1) == b"g"
"""


def start_child(body: str) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD + textwrap.dedent(body), str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    ours.settimeout(TIMEOUT)
    return proc, ours


def finish(proc: subprocess.Popen, sock: socket.socket) -> None:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    sock.close()
    assert proc.returncode == 0, (out.decode(), err.decode())


def read_reply(sock: socket.socket, proc: subprocess.Popen) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            proc.kill()
            raise AssertionError(f"the child closed the socket: {proc.communicate()[1].decode()}")
        buf += chunk
    return buf.decode().strip()


def share(pool, sock, data: bytes = b"\0") -> None:
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    try:
        hip.send_fds(sock, [fd], data, timeout=TIMEOUT)
    finally:
        os.close(fd)


# -- creation and the device's pools -------------------------------------------------------


def test_create_validates_props_with_hips_codes(pools, monkeypatch):
    pools(props(handles=hip.hipMemHandleTypeNone))
    pools(props(max_size=MiB))
    bad = [
        (props(), {"allocType": hip.hipMemAllocationType.hipMemAllocationTypeInvalid}),
        (props(), {"location": hip.hipMemLocation(0, 0)}),
        (props(), {"location": hip.hipMemLocation(hip.hipMemLocationTypeDevice, 1)}),
        (props(), {"location": hip.hipMemLocation(hip.hipMemLocationTypeDevice, -1)}),
        (props(), {"handleTypes": 0x10}),
        (props(), {"maxSize": -1}),
        (props(), {"reserved": b"\1" + bytes(55)}),
        (props(), {"win32SecurityAttributes": object()}),
    ]
    for p, change in bad:
        for key, value in change.items():
            setattr(p, key, value)
        assert code_of(hip.hipMemPoolCreate, p) == E.hipErrorInvalidValue, change
    p = props(handles=hip.hipMemAllocationHandleType.hipMemHandleTypeWin32)
    assert code_of(hip.hipMemPoolCreate, p) == E.hipErrorNotSupported
    assert code_of(hip.hipMemPoolCreate, None) == E.hipErrorInvalidValue
    assert code_of(hip.hipMemPoolDestroy, None) == E.hipErrorInvalidValue
    attr = hip.hipDeviceAttribute_t
    assert hip.hipDeviceGetAttribute(attr.hipDeviceAttributeMemoryPoolsSupported, 0) == 1
    assert hip.hipDeviceGetAttribute(attr.hipDeviceAttributeMemoryPoolSupportedHandleTypes, 0) == 1


def test_pool_create_out_of_memory_past_the_file_size_limit():
    """No memory cgroup here: RLIMIT_FSIZE stands for a full memory (the memfd cannot take the
    pool's size), in a child; hipErrorOutOfMemory, not a crash (SIGXFSZ is ignored)."""
    proc = run_python(
        """
        import resource, signal
        import hipipc as hip
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1,
                                location=hip.hipMemLocation(1, 0), maxSize=1 << 30)
        try:
            hip.hipMemPoolCreate(p)
        except hip.HipError as exc:
            print(exc.code.name)
        """
    )
    assert proc.stdout.decode().split() == ["hipErrorOutOfMemory"], proc.stderr.decode()


def test_allocation_beyond_the_memory_left_is_out_of_memory(pools):
    """A pool may be larger than the memory (address space only); an allocation the memory
    cannot hold is hipErrorOutOfMemory at the call (hipipc.memfd checks it against the memory
    left: fallocate on a memfd would wake the OOM killer instead), and the pool stays usable."""
    from hipipc.memfd import available_memory

    too_big = available_memory() + (1 << 30)
    try:
        pool = pools(props(max_size=too_big + (1 << 30)))
    except hip.HipError as exc:  # RLIMIT_AS too small to map such a pool
        pytest.skip(f"cannot map a pool larger than the memory here: {exc}")
    assert code_of(hip.hipMallocFromPoolAsync, too_big, pool, None) == E.hipErrorOutOfMemory
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0
    hip.hipFree(hip.hipMallocFromPoolAsync(MiB, pool, None))


def test_max_size_limits_the_pool_and_frees_coalesce(pools, stream):
    pool = pools(props(max_size=MiB))
    s = stream()
    a = hip.hipMallocFromPoolAsync(MiB // 2, pool, s)
    assert code_of(hip.hipMallocFromPoolAsync, MiB // 2 + 1, pool, s) == E.hipErrorOutOfMemory
    quarters = [hip.hipMallocFromPoolAsync(MiB // 8, pool, s) for _ in range(4)]
    assert code_of(hip.hipMallocFromPoolAsync, 1, pool, s) == E.hipErrorOutOfMemory
    hip.hipFreeAsync(quarters[1], s)
    hip.hipFreeAsync(quarters[2], s)
    hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    b = hip.hipMallocFromPoolAsync(MiB // 4, pool, s)  # the two freed quarters, coalesced
    assert b == quarters[1]
    for ptr in (a, b, quarters[0], quarters[3]):
        hip.hipFree(ptr)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0
    assert hip.hipMallocFromPoolAsync(0, pool, s) == 0
    assert code_of(hip.hipMallocFromPoolAsync, -1, pool, s) == E.hipErrorInvalidValue
    assert code_of(hip.hipMallocFromPoolAsync, 8, "pool", s) == E.hipErrorInvalidValue


def test_pool_memory_is_device_memory(pools, stream):
    pool = pools()
    s = stream()
    ptr = hip.hipMallocFromPoolAsync(1000, pool, s)
    hip.hipMemsetAsync(ptr, 7, 1000, s)
    host = bytearray(1000)
    hip.hipMemcpyAsync(host, ptr, 1000, hip.hipMemcpyDeviceToHost, s)
    hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    assert host == b"\7" * 1000
    assert hip.hipMemGetAddressRange(ptr + 10) == (ptr, 1000)
    attrs = hip.hipPointerGetAttributes(ptr + 1)
    assert attrs.type == hip.hipMemoryTypeDevice and attrs.allocationBase == ptr
    view = hip.asarray(ptr, 1000)
    assert (view == 7).all()
    assert code_of(hip.hipMemset, ptr, 0, 1001) == E.hipErrorInvalidValue
    assert code_of(hip.hipIpcGetMemHandle, ptr) == E.hipErrorInvalidValue
    assert code_of(hip.hipFree, ptr + 8) == E.hipErrorInvalidValue
    assert code_of(hip.hipFreeAsync, ptr + 8, s) == E.hipErrorInvalidValue
    hip.hipFree(ptr)
    assert code_of(hip.hipFree, ptr) == E.hipErrorInvalidValue
    del view  # it kept the pool's mapping alive, nothing more


def test_free_async_takes_effect_in_stream_order(pools, stream, gate):
    pool = pools()
    s, g = stream(), gate()
    ptr = hip.hipMallocFromPoolAsync(4096, pool, s)
    hip.hipLaunchHostFunc(s, g.wait, 30)
    hip.hipFreeAsync(ptr, s)
    # The pointer is gone for the caller at once, the memory only when the stream gets there.
    assert code_of(hip.hipMemset, ptr, 0, 1) == E.hipErrorInvalidValue
    assert code_of(hip.hipFreeAsync, ptr, s) == E.hipErrorInvalidValue  # double free
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 4096
    other = hip.hipMallocFromPoolAsync(4096, pool, s)
    assert other != ptr  # its range is not free yet
    g.set()
    hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 4096
    assert hip.hipMallocFromPoolAsync(4096, pool, s) == ptr  # reused, first fit
    hip.hipFreeAsync(0, s)  # nothing, as in HIP
    plain = hip.hipMalloc(64)
    assert code_of(hip.hipFreeAsync, plain, s) == E.hipErrorInvalidValue
    hip.hipFree(plain)
    dead = hip.hipStreamCreate()
    hip.hipStreamDestroy(dead)
    assert code_of(hip.hipFreeAsync, other, dead) == E.hipErrorInvalidHandle
    assert code_of(hip.hipMallocFromPoolAsync, 8, pool, dead) == E.hipErrorInvalidHandle
    hip.hipFreeAsync(other, s)
    hip.hipFreeAsync(ptr, None)
    hip.hipDeviceSynchronize(timeout=TIMEOUT)


def test_malloc_async_and_the_devices_pools(pools, monkeypatch):
    default = hip.hipDeviceGetDefaultMemPool(0)
    assert hip.hipDeviceGetMemPool(0) is default
    ptr = hip.hipMallocAsync(100)
    used = hip.hipMemPoolGetAttribute(default, A.hipMemPoolAttrUsedMemCurrent)
    assert used >= 4096
    hip.hipFreeAsync(ptr)
    assert hip.hipMallocAsync(0) == 0
    assert code_of(hip.hipMemPoolDestroy, default) == E.hipErrorInvalidValue
    assert code_of(hip.hipMemPoolExportToShareableHandle, default, PFD, 0) == E.hipErrorInvalidValue
    mine = pools(props(handles=hip.hipMemHandleTypeNone))
    hip.hipDeviceSetMemPool(0, mine)
    assert hip.hipDeviceGetMemPool(0) is mine
    ptr = hip.hipMallocAsync(64)
    assert hip.hipMemPoolGetAttribute(mine, A.hipMemPoolAttrUsedMemCurrent) == 4096
    hip.hipFreeAsync(ptr)
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    hip.hipMemPoolDestroy(mine)
    assert hip.hipDeviceGetMemPool(0) is default  # destroying the current pool: the default
    assert code_of(hip.hipMemPoolDestroy, mine) == E.hipErrorInvalidValue  # twice
    assert code_of(hip.hipDeviceSetMemPool, 0, mine) == E.hipErrorInvalidValue
    for call in (hip.hipDeviceGetDefaultMemPool, hip.hipDeviceGetMemPool):
        assert code_of(call, 1) == E.hipErrorInvalidDevice
    assert code_of(hip.hipDeviceSetMemPool, 1, default) == E.hipErrorInvalidDevice
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "2")
    assert code_of(hip.hipDeviceSetMemPool, 1, default) == E.hipErrorInvalidValue  # device 0's
    assert code_of(hip.hipMallocFromPoolAsync, 8, mine, None) == E.hipErrorInvalidValue


def test_release_threshold_trim_and_attributes(pools):
    pool = pools(props(max_size=16 * MiB))
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    try:
        base = os.fstat(fd).st_blocks  # the header and the table

        def committed() -> int:
            return (os.fstat(fd).st_blocks - base) * 512

        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolAttrReleaseThreshold, 4 * MiB)
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrReleaseThreshold) == 4 * MiB
        ptrs = [hip.hipMallocFromPoolAsync(MiB, pool, None) for _ in range(8)]
        assert committed() == 8 * MiB  # reserved at allocation (posix_fallocate)
        for ptr in ptrs:
            hip.hipFree(ptr)
        # Up to the threshold stays committed for reuse; the rest went back to the kernel.
        assert committed() == 4 * MiB
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrReservedMemCurrent) == 4 * MiB
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemHigh) == 8 * MiB
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrReservedMemHigh) == 8 * MiB
        keep = hip.hipMallocFromPoolAsync(MiB, pool, None)
        hip.hipMemPoolTrimTo(pool, 0)
        assert committed() == MiB  # the live allocation is never released
        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolAttrUsedMemHigh, 0)
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemHigh) == MiB
        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolAttrReservedMemHigh, 0)
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrReservedMemHigh) == MiB
        hip.hipFree(keep)
        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolReuseAllowOpportunistic, 0)
        assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolReuseAllowOpportunistic) == 0
        for attr in (A.hipMemPoolAttrUsedMemCurrent, A.hipMemPoolAttrReservedMemCurrent):
            assert code_of(hip.hipMemPoolSetAttribute, pool, attr, 0) == E.hipErrorInvalidValue
        for attr in (A.hipMemPoolAttrUsedMemHigh, A.hipMemPoolAttrReservedMemHigh):
            assert code_of(hip.hipMemPoolSetAttribute, pool, attr, 5) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolSetAttribute, pool, 99, 0) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolGetAttribute, pool, 0) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolGetAttribute, None, 4) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolSetAttribute, pool, 4, -1) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolTrimTo, pool, -1) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemPoolTrimTo, None, 0) == E.hipErrorInvalidValue
    finally:
        os.close(fd)


def test_access_follows_hips_validation_matrix(pools, monkeypatch):
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "2")
    pool = pools()
    loc = hip.hipMemLocation

    def desc(device, flags, kind=hip.hipMemLocationTypeDevice):
        return hip.hipMemAccessDesc(loc(kind, device), flags)

    rw, ro, none = (
        hip.hipMemAccessFlagsProtReadWrite,
        hip.hipMemAccessFlagsProtRead,
        hip.hipMemAccessFlagsProtNone,
    )
    assert hip.hipMemPoolGetAccess(pool, loc(hip.hipMemLocationTypeDevice, 0)) == rw
    assert hip.hipMemPoolGetAccess(pool, loc(hip.hipMemLocationTypeDevice, 1)) == none
    hip.hipMemPoolSetAccess(pool, [desc(0, rw), desc(1, rw)], 2)
    assert hip.hipMemPoolGetAccess(pool, loc(hip.hipMemLocationTypeDevice, 1)) == rw
    hip.hipMemPoolSetAccess(pool, desc(1, ro))
    assert hip.hipMemPoolGetAccess(pool, loc(hip.hipMemLocationTypeDevice, 1)) == ro
    cases = [
        ([desc(0, none)], E.hipErrorInvalidDevice),  # revoking the pool's own device
        ([desc(0, ro)], E.hipErrorNotSupported),
        ([desc(2, rw)], E.hipErrorInvalidDevice),
        ([desc(-1, rw)], E.hipErrorInvalidDevice),
        ([desc(1, 0xFFFF)], E.hipErrorInvalidValue),
        ([desc(1, rw, kind=0)], E.hipErrorInvalidValue),
        ([desc(1, none), desc(0, none)], E.hipErrorInvalidDevice),  # checked before applied
        (["desc"], E.hipErrorInvalidValue),
    ]
    for descs, code in cases:
        assert code_of(hip.hipMemPoolSetAccess, pool, descs) == code, descs
    assert hip.hipMemPoolGetAccess(pool, loc(hip.hipMemLocationTypeDevice, 1)) == ro
    assert code_of(hip.hipMemPoolSetAccess, pool, [desc(1, rw)], 3) == E.hipErrorInvalidDevice
    assert code_of(hip.hipMemPoolSetAccess, None, [desc(1, rw)]) == E.hipErrorInvalidValue
    for bad in (loc(0, 0), loc(hip.hipMemLocationTypeDevice, 2), None):
        assert code_of(hip.hipMemPoolGetAccess, pool, bad) == E.hipErrorInvalidValue


# -- export and import ---------------------------------------------------------------------


def test_export_and_import_refuse_misuse(pools, tmp_path):
    local = pools(props(handles=hip.hipMemHandleTypeNone))
    pool = pools()
    lp = hip.hipMallocFromPoolAsync(64, local, None)
    ptr = hip.hipMallocFromPoolAsync(64, pool, None)
    plain = hip.hipMalloc(64)
    try:
        for args in ((local, PFD, 0), (pool, 0, 0), (pool, PFD, 1), (None, PFD, 0)):
            assert code_of(hip.hipMemPoolExportToShareableHandle, *args) == E.hipErrorInvalidValue
        for bad in (0, None, plain, lp, ptr + 8, "ptr"):
            assert code_of(hip.hipMemPoolExportPointer, bad) == E.hipErrorInvalidValue, bad
        data = hip.hipMemPoolExportPointer(ptr)
        assert len(bytes(data)) == 64 and data == hip.hipMemPoolExportPointer(ptr)
        fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        try:
            for args in ((None, PFD, 0), (fd, 0, 0), (fd, PFD, 1), (-1, PFD, 0)):
                code = code_of(hip.hipMemPoolImportFromShareableHandle, *args)
                assert code == E.hipErrorInvalidValue, args
            imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
        finally:
            os.close(fd)
        # Not pool files: a closed descriptor, a pipe, a regular file, an unsealed memfd.
        (tmp_path / "f").write_bytes(bytes(8192))
        r, w = os.pipe()
        plain_fd = os.open(tmp_path / "f", os.O_RDONLY)
        unsealed = os.memfd_create("x")
        os.ftruncate(unsealed, 1 << 20)
        # A copy of the real pool's header in a memfd that also refuses writable mappings.
        write_sealed = os.memfd_create("y", os.MFD_ALLOW_SEALING)
        os.ftruncate(write_sealed, os.fstat(unsealed).st_size)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(write_sealed, fcntl.F_ADD_SEALS, seals)
        for bad in (r, plain_fd, unsealed, write_sealed, 10**6):
            code = code_of(hip.hipMemPoolImportFromShareableHandle, bad, PFD, 0)
            assert code == E.hipErrorInvalidValue, bad
        for x in (r, w, plain_fd, unsealed, write_sealed):
            os.close(x)
        # An imported pool: no allocation, no export, no device pool, no export of its
        # pointers; local pools cannot import.
        for call, args in (
            (hip.hipMallocFromPoolAsync, (64, imported, None)),
            (hip.hipMemPoolExportToShareableHandle, (imported, PFD, 0)),
            (hip.hipDeviceSetMemPool, (0, imported)),
            (hip.hipMemPoolImportPointer, (pool, data)),
            (hip.hipMemPoolImportPointer, (imported, None)),
            (hip.hipMemPoolImportPointer, (imported, bytes(63))),
            (hip.hipMemPoolImportPointer, (None, data)),
        ):
            assert code_of(call, *args) == E.hipErrorInvalidValue, call.__name__
        # hip-tests' SameProc: the import is a second mapping of the same memory.
        mine = hip.hipMemPoolImportPointer(imported, data)
        assert mine != ptr and hip.hipMemPoolImportPointer(imported, bytes(data)) == mine
        hip.hipMemset(mine, 5, 64)
        assert bytes(hip.asarray(ptr, 64)) == b"\5" * 64
        assert code_of(hip.hipMemPoolExportPointer, mine) == E.hipErrorInvalidValue
        hip.hipFree(mine)  # one free per import
        hip.hipFreeAsync(mine, None)
        hip.hipDeviceSynchronize(timeout=TIMEOUT)
        assert code_of(hip.hipFree, mine) == E.hipErrorInvalidValue
        hip.hipMemPoolDestroy(imported)
    finally:
        hip.hipFree(plain)
        hip.hipFree(lp)
        hip.hipFree(ptr)


def test_export_data_of_another_pool_or_freed_allocation_is_refused(pools):
    p1, p2 = pools(), pools()
    a, b = hip.hipMallocFromPoolAsync(64, p1, None), hip.hipMallocFromPoolAsync(64, p2, None)
    fd = hip.hipMemPoolExportToShareableHandle(p1, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    os.close(fd)
    other = hip.hipMemPoolExportPointer(b)
    assert code_of(hip.hipMemPoolImportPointer, imported, other) == E.hipErrorInvalidValue
    data = hip.hipMemPoolExportPointer(a)
    hip.hipFree(a)
    assert code_of(hip.hipMemPoolImportPointer, imported, data) == E.hipErrorInvalidValue
    a2 = hip.hipMallocFromPoolAsync(64, p1, None)  # same range and slot, a new serial
    assert code_of(hip.hipMemPoolImportPointer, imported, data) == E.hipErrorInvalidValue
    hip.hipMemPoolDestroy(imported)
    hip.hipFree(a2)
    hip.hipFree(b)


def test_hostile_export_data_and_table_never_crash(pools):
    pool = pools(props(max_size=MiB))
    ptr = hip.hipMallocFromPoolAsync(8192, pool, None)
    good = bytes(hip.hipMemPoolExportPointer(ptr))
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    rng = np.random.default_rng(13)
    try:
        for i in range(64):  # every single-byte change
            bad = bytearray(good)
            bad[i] ^= 1 << int(rng.integers(8))
            assert (
                code_of(hip.hipMemPoolImportPointer, imported, bytes(bad)) == E.hipErrorInvalidValue
            )
        for _ in range(300):  # garbage, and garbage behind a valid prefix
            junk = rng.bytes(64)
            for raw in (junk, good[: 8 + int(rng.integers(56))] + junk):
                raw = raw[:64]
                code = code_of(hip.hipMemPoolImportPointer, imported, raw)
                assert code == E.hipErrorInvalidValue
        # A writer of the pool file forges a table entry out of range, and a second
        # allocation's range over the first: both refused without touching memory.
        fields = list(struct.unpack("<8sIIQQQ16s8s", good))
        size = os.fstat(fd).st_size
        for off, slot in ((size, 5), (size - 4096, 6), (fields[3] + 4096, 7)):
            forged = fields.copy()
            forged[2], forged[3], forged[4] = slot, off, 8192
            entry = struct.pack("<QQQQ", off, 8192, forged[5], 1)
            os.pwrite(fd, entry, 4096 + slot * 32)
            raw = struct.pack("<8sIIQQQ16s8s", *forged)
            if off + 8192 <= size:
                mine = hip.hipMemPoolImportPointer(imported, raw)  # in range: aliasing only
                assert (
                    code_of(hip.hipMemPoolImportPointer, imported, good) == E.hipErrorInvalidValue
                )
                hip.hipFree(mine)
            else:
                code = code_of(hip.hipMemPoolImportPointer, imported, raw)
                assert code == E.hipErrorInvalidValue
            os.pwrite(fd, bytes(32), 4096 + slot * 32)
        mine = hip.hipMemPoolImportPointer(imported, good)  # the real one still works
        hip.hipFree(mine)
    finally:
        os.close(fd)
        hip.hipMemPoolDestroy(imported)
        hip.hipFree(ptr)


def test_forged_pool_files_are_refused():
    fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        assert (
            code_of(hip.hipMemPoolImportFromShareableHandle, fd, PFD, 0) == E.hipErrorInvalidValue
        )
        header = poolcore._HEADER.pack(b"hipipcMP", 1, poolcore.CAPACITY, 0, 1 << 30, 0, bytes(16))
        os.pwrite(fd, header, 0)  # claims a size the file does not have
        assert (
            code_of(hip.hipMemPoolImportFromShareableHandle, fd, PFD, 0) == E.hipErrorInvalidValue
        )
    finally:
        os.close(fd)


# -- lifetimes -----------------------------------------------------------------------------


def test_destroy_with_live_allocations_and_imports_defers(pools):
    before = open_fds()
    pool = hip.hipMemPoolCreate(props(max_size=MiB))
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    os.close(fd)
    mine = hip.hipMemPoolImportPointer(imported, hip.hipMemPoolExportPointer(ptr))
    hip.hipMemPoolDestroy(pool)  # HIP: returns at once, the memory goes with the last free
    hip.hipMemPoolDestroy(imported)
    assert code_of(hip.hipMallocFromPoolAsync, 64, pool, None) == E.hipErrorInvalidValue
    hip.hipMemset(ptr, 3, 4096)
    assert bytes(hip.asarray(mine, 4)) == b"\3" * 4
    assert open_fds() != before  # the pool's memfd is still open
    hip.hipFree(mine)
    hip.hipFree(ptr)
    assert open_fds() == before


def test_device_reset_frees_pool_memory(pools):
    pool = pools()
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    os.close(fd)
    data = hip.hipMemPoolExportPointer(ptr)
    mine = hip.hipMemPoolImportPointer(imported, data)
    assert hip.hipMemPoolImportPointer(imported, data) == mine  # two imports, one pointer
    hip.hipDeviceReset()
    for p in (ptr, mine):
        assert code_of(hip.hipFree, p) == E.hipErrorInvalidValue
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0
    hip.hipMemPoolDestroy(imported)  # the pools stay, as the default pools do


def _in_child(pool, ptr: int, fd: int) -> list[str]:
    out = []
    for call, args in (
        (hip.hipMallocFromPoolAsync, (64, pool, None)),
        (hip.hipFree, (ptr,)),
        (hip.hipMemPoolExportToShareableHandle, (pool, PFD, 0)),
    ):
        try:
            call(*args)
            out.append("ok")
        except hip.HipError as exc:
            out.append(exc.code.name)
    own = hip.hipMallocAsync(64)  # the child's own default pool
    hip.hipFree(own)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)  # inherited descriptor
    mine = hip.hipMemPoolImportPointer(imported, DATA[0])
    out.append(bytes(hip.asarray(mine, 2)).hex())
    hip.hipFree(mine)
    hip.hipMemPoolDestroy(imported)
    return out


DATA: list[bytes] = []


def test_a_forked_child_cannot_use_its_parents_pools_but_can_import_them(pools):
    pool = pools()
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    hip.hipMemset(ptr, 0xAB, 4096)
    DATA[:] = [bytes(hip.hipMemPoolExportPointer(ptr))]
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    try:
        out = in_fork(_in_child, pool, ptr, fd, timeout=TIMEOUT)
    finally:
        os.close(fd)
    assert out == ["hipErrorInvalidValue"] * 3 + ["abab"]
    hip.hipFree(ptr)  # the parent's pool is untouched by the child's
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def test_no_descriptor_leaks_over_many_cycles(pools):
    before = open_fds()
    for _ in range(100):
        pool = hip.hipMemPoolCreate(props(max_size=MiB))
        ptr = hip.hipMallocFromPoolAsync(100, pool, None)
        fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
        imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
        os.close(fd)
        mine = hip.hipMemPoolImportPointer(imported, hip.hipMemPoolExportPointer(ptr))
        hip.hipFreeAsync(mine, None)
        hip.hipFreeAsync(ptr, None)
        hip.hipMemPoolDestroy(imported)
        hip.hipMemPoolDestroy(pool)
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    assert open_fds() == before


# -- real processes ------------------------------------------------------------------------


def test_pool_and_pointers_shared_with_another_process(pools, stream):
    pool = pools()
    s = stream()
    ptr = hip.hipMallocFromPoolAsync(MiB, pool, s)
    hip.hipMemsetAsync(ptr, 0x11, MiB, s)
    hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    proc, sock = start_child(
        """
        ptr = hip.hipMemPoolImportPointer(pool, data)
        view = hip.asarray(ptr, 1 << 20)
        ok = bool((view == 0x11).all())
        s = hip.hipStreamCreate()
        hip.hipMemsetAsync(ptr, 0x22, 1 << 20, s)
        del view
        hip.hipFreeAsync(ptr, s)          # the importer frees before the exporter
        hip.hipStreamSynchronize(s)
        hip.hipMemPoolDestroy(pool)
        reply({"ok": ok})
        """
    )
    share(pool, sock, bytes(hip.hipMemPoolExportPointer(ptr)))
    assert read_reply(sock, proc) == '{"ok": true}'
    finish(proc, sock)
    assert (hip.asarray(ptr, MiB) == 0x22).all()
    hip.hipFreeAsync(ptr, s)


def test_import_after_the_exporter_freed_is_refused(pools):
    pool = pools()
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    data = bytes(hip.hipMemPoolExportPointer(ptr))
    hip.hipFree(ptr)
    proc, sock = start_child(
        """
        try:
            hip.hipMemPoolImportPointer(pool, data)
            reply("imported")
        except hip.HipError as exc:
            reply(exc.code.name)
        hip.hipMemPoolDestroy(pool)
        """
    )
    share(pool, sock, data)
    assert read_reply(sock, proc) == '"hipErrorInvalidValue"'
    finish(proc, sock)


def test_a_range_an_importer_holds_is_not_reused_until_it_lets_go(pools):
    """CUDA leaves a free before the importers' undefined; here the importer's lease (an OFD
    lock on its range) keeps the range out of reuse and release until it frees it, or dies."""
    pool = pools(props(max_size=MiB))
    ptr = hip.hipMallocFromPoolAsync(64 * 1024, pool, None)
    hip.hipMemset(ptr, 0x33, 64 * 1024)
    proc, sock = start_child(
        """
        ptr = hip.hipMemPoolImportPointer(pool, data)
        reply("imported")
        wait()                                   # the exporter freed and reallocated
        view = hip.asarray(ptr, 1 << 16)
        reply(bool((view == 0x33).all()))
        wait()
        os.kill(os.getpid(), 9)                  # dies holding the import: the lease goes
        """
    )
    share(pool, sock, bytes(hip.hipMemPoolExportPointer(ptr)))
    assert read_reply(sock, proc) == '"imported"'
    hip.hipFree(ptr)
    again = hip.hipMallocFromPoolAsync(64 * 1024, pool, None)
    assert again != ptr  # held for the importer
    hip.hipMemset(again, 0x44, 64 * 1024)
    sock.sendall(b"g")
    assert read_reply(sock, proc) == "true"  # its contents are still its own
    sock.sendall(b"g")
    assert proc.wait(TIMEOUT) == -9
    sock.close()
    third = hip.hipMallocFromPoolAsync(64 * 1024, pool, None)
    assert third == ptr  # the lease died with the importer: the range is reused
    hip.hipFree(third)
    hip.hipFree(again)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def test_importer_keeps_its_memory_after_the_exporter_frees_and_exits():
    """An exporter process hands a pool and a pointer to this one and exits (without freeing
    or destroying): the import stays valid, as for IPC memory; nothing is unmapped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = """
        import socket, sys, os
        import hipipc as hip
        sock = socket.socket(fileno=int(sys.argv[1]))
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1, location=hip.hipMemLocation(1, 0))
        pool = hip.hipMemPoolCreate(p)
        ptr = hip.hipMallocFromPoolAsync(1 << 16, pool, None)
        hip.hipMemset(ptr, 0x5A, 1 << 16)
        fd = hip.hipMemPoolExportToShareableHandle(pool, hip.hipMemHandleTypePosixFileDescriptor, 0)
        hip.send_fds(sock, [fd], bytes(hip.hipMemPoolExportPointer(ptr)), timeout=60)
        assert sock.recv(1) == b"g"   # the importer has imported
        hip.hipFree(ptr)              # misuse in CUDA terms: freed before the importer
        hip.hipMemPoolDestroy(pool)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        data, fds = hip.recv_fds(ours, maxfds=1, timeout=TIMEOUT)
        pool = hip.hipMemPoolImportFromShareableHandle(fds[0], PFD, 0)
        os.close(fds[0])
        ptr = hip.hipMemPoolImportPointer(pool, data)
        ours.sendall(b"g")
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read().decode()
        view = hip.asarray(ptr, 1 << 16)
        view[:] = 7  # still mapped and writable: no SIGBUS, no segfault
        assert (view == 7).all()
        hip.hipMemPoolDestroy(pool)
        hip.hipFree(ptr)
        assert (view == 7).all()  # the view keeps the mapping after the free
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- send_fds / recv_fds -------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_received_descriptors_are_close_on_exec_and_not_inherited(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        hip.send_fds(a, [r, w], b"two", timeout=TIMEOUT)
        data, fds = hip.recv_fds(b, maxfds=2, timeout=TIMEOUT)
        assert data == b"two" and len(fds) == 2
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        listing = subprocess.run(
            ["ls", "/proc/self/fd"], capture_output=True, close_fds=False, timeout=TIMEOUT
        ).stdout.split()
        assert not {str(fd).encode() for fd in fds} & set(listing)
        for fd in fds:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_over_limit_and_truncated_messages_close_their_descriptors(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        hip.send_fds(a, [r, w, r], timeout=TIMEOUT)
        assert code_of(hip.recv_fds, b, maxfds=2, timeout=TIMEOUT) == E.hipErrorInvalidValue
        assert open_fds() == before  # the three received copies were closed
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with s1, s2:
            before = open_fds()
            hip.send_fds(s1, [r], b"x" * 100, timeout=TIMEOUT)
            code = code_of(hip.recv_fds, s2, maxfds=1, bufsize=10, timeout=TIMEOUT)
            assert code == E.hipErrorInvalidValue
            assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_send_recv_fds_timeouts_eof_and_bad_arguments(pair):
    a, b = pair
    with pytest.raises(TimeoutError):
        hip.recv_fds(b, timeout=0.05)
    for bad in ([], [-1], [10**6], "x"):
        assert code_of(hip.send_fds, a, bad) == E.hipErrorInvalidValue, bad
    assert code_of(hip.send_fds, a, [0], b"") == E.hipErrorInvalidValue
    assert code_of(hip.send_fds, a, [0], timeout=-1) == E.hipErrorInvalidValue
    assert code_of(hip.recv_fds, b, maxfds=0) == E.hipErrorInvalidValue
    assert code_of(hip.recv_fds, b, bufsize=0) == E.hipErrorInvalidValue
    inet = socket.socket(socket.AF_INET)
    with inet:
        assert code_of(hip.send_fds, inet, [0]) == E.hipErrorInvalidValue
    a.close()
    with pytest.raises(EOFError):
        hip.recv_fds(b, timeout=TIMEOUT)
    assert code_of(hip.recv_fds, a) == E.hipErrorInvalidValue  # closed
