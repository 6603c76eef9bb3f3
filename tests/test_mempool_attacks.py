"""Adversarial review of memory pools (issue 13, section 2): a hostile pool descriptor or pool
header, a peer that locks the pool file, descriptor exhaustion at import, attribute values
beyond HIP's 64-bit range, many threads allocating and freeing on many streams, and a forked
child using its parent's pool.  Each test is the attack that found a bug (or one that held)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import threading

import pytest
from _proc import in_fork, run_python

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


def props(max_size=MiB) -> hip.hipMemPoolProps:
    return hip.hipMemPoolProps(
        allocType=hip.hipMemAllocationTypePinned,
        handleTypes=PFD,
        location=hip.hipMemLocation(hip.hipMemLocationTypeDevice, 0),
        maxSize=max_size,
    )


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def pool():
    made = hip.hipMemPoolCreate(props())
    yield made
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    if not made.destroyed:
        hip.hipMemPoolDestroy(made)


def forged_pool(device: int = 0, size: int = poolcore._DATA_OFFSET + MiB) -> int:
    """A sealed memfd with a well-formed pool header: what a hostile peer can send."""
    fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    header = poolcore._HEADER.pack(
        b"hipipcMP", 1, poolcore.CAPACITY, device, size, poolcore._DATA_OFFSET, bytes(16)
    )
    os.pwrite(fd, header, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


# -- hostile pool descriptors ----------------------------------------------------------------


def test_a_read_only_or_write_only_pool_descriptor_is_invalid_value(pool):
    """A descriptor of a real pool reopened read-only (or write-only) cannot be mapped shared
    and writable: HIP's documented code for a bad handle is hipErrorInvalidValue (the call
    returns only InvalidValue or OutOfMemory), not hipErrorMapFailed; nothing leaks."""
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    try:
        for mode in (os.O_RDONLY, os.O_WRONLY):
            other = os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
            try:
                before = open_fds()
                code = code_of(hip.hipMemPoolImportFromShareableHandle, other, PFD, 0)
                assert code == E.hipErrorInvalidValue
                assert open_fds() == before
            finally:
                os.close(other)
    finally:
        os.close(fd)


def test_a_pool_header_naming_a_missing_device_is_refused():
    """The header's device is hostile input: a pool on a device this process does not have
    would hand out pointers that hipPointerGetAttributes reports on that device."""
    count = hip.hipGetDeviceCount()
    fd = forged_pool(device=count)
    try:
        before = open_fds()
        code = code_of(hip.hipMemPoolImportFromShareableHandle, fd, PFD, 0)
        assert code == E.hipErrorInvalidValue
        assert open_fds() == before
    finally:
        os.close(fd)
    fd = forged_pool(device=0)  # the same file on an existing device imports
    try:
        hip.hipMemPoolDestroy(hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0))
    finally:
        os.close(fd)


def test_import_refused_when_a_peer_write_locks_the_pool_file(pool):
    """A peer holding the descriptor takes a write lock over the data: the importer's lease
    (a read lock) is refused.  Importing without the lease would let the exporter reuse the
    range under the importer's pointer, silently: the import must fail instead."""
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    data = hip.hipMemPoolExportPointer(ptr)
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    hostile = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # its own description
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)  # the whole file
        fcntl.fcntl(hostile, poolcore._F_OFD_SETLK, lock)
        assert code_of(hip.hipMemPoolImportPointer, imported, data) == E.hipErrorInvalidValue
        os.close(hostile)  # the lock goes with the description
        hostile = -1
        mine = hip.hipMemPoolImportPointer(imported, data)
        hip.hipFree(mine)
    finally:
        if hostile >= 0:
            os.close(hostile)
        os.close(fd)
        hip.hipMemPoolDestroy(imported)
        hip.hipFree(ptr)


def test_descriptor_exhaustion_at_import_is_out_of_memory_not_a_silent_lease_loss():
    """At RLIMIT_NOFILE (soft = hard) the importer cannot open its lease description: the
    import must fail with hipErrorOutOfMemory naming the limit.  Before the fix it went on
    without a lease, and the exporter then reused memory the importer still used."""
    out = run_python(
        """
        import os, resource
        import hipipc as hip
        PFD = hip.hipMemHandleTypePosixFileDescriptor
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1, location=hip.hipMemLocation(1, 0),
                                maxSize=1 << 20)
        pool = hip.hipMemPoolCreate(p)
        fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
        n = len(os.listdir("/proc/self/fd")) + 4
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        fill = []
        try:
            while True:
                fill.append(os.dup(0))
        except OSError:
            pass
        try:
            hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
            print("imported")
        except hip.HipError as exc:
            print(exc.code.name, "RLIMIT_NOFILE" in str(exc))
        for f in fill:
            os.close(f)
        os.close(fd)
        hip.hipMemPoolDestroy(pool)
        """,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["hipErrorOutOfMemory", "True"]


# -- attribute values --------------------------------------------------------------------------


def test_attribute_values_beyond_64_bits_are_invalid(pool):
    """HIP's values are uint64_t: a Python int past 2**64 - 1 cannot be one."""
    for attr in (A.hipMemPoolAttrReleaseThreshold, A.hipMemPoolReuseAllowOpportunistic):
        assert code_of(hip.hipMemPoolSetAttribute, pool, attr, 1 << 64) == E.hipErrorInvalidValue
    hip.hipMemPoolSetAttribute(pool, A.hipMemPoolAttrReleaseThreshold, (1 << 64) - 1)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrReleaseThreshold) == (1 << 64) - 1


# -- threads, streams, fork (attacks that held) ------------------------------------------------


def test_threads_allocate_and_free_on_many_streams_without_overlap(pool):
    """Four threads, each with its own stream, allocate, fill, check and free in stream order
    (also frees of pointers another thread allocated); no two live allocations overlap, every
    byte written is read back, and the pool's accounting returns to zero."""
    streams = [hip.hipStreamCreate() for _ in range(4)]
    errors: list[BaseException] = []
    handoff: list[int] = []
    handoff_lock = threading.Lock()

    def work(i: int) -> None:
        s = streams[i]
        try:
            for k in range(60):
                n = 4096 * (1 + (i + k) % 3)
                ptr = hip.hipMallocFromPoolAsync(n, pool, s)
                hip.hipMemsetAsync(ptr, i + 1, n, s)
                hip.hipStreamSynchronize(s, timeout=TIMEOUT)
                assert bytes(hip.asarray(ptr, n)) == bytes([i + 1]) * n
                with handoff_lock:
                    handoff.append(ptr)
                    victim = handoff.pop(0)
                hip.hipFreeAsync(victim, s)  # maybe another thread's pointer
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for ptr in handoff:
        hip.hipFreeAsync(ptr, None)
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    for s in streams:
        hip.hipStreamDestroy(s)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def test_destroy_racing_allocations_never_loses_memory_or_descriptors():
    """hipMemPoolDestroy from one thread while another allocates: each allocation either
    succeeds (and its free closes the pool) or is refused with hipErrorInvalidValue."""
    before = open_fds()
    for _ in range(20):
        p = hip.hipMemPoolCreate(props())
        got: list[int] = []
        codes: list[E] = []

        def alloc(p=p, got=got, codes=codes) -> None:
            for _ in range(50):
                try:
                    got.append(hip.hipMallocFromPoolAsync(4096, p, None))
                except hip.HipError as exc:
                    codes.append(exc.code)
                    return

        t = threading.Thread(target=alloc)
        t.start()
        hip.hipMemPoolDestroy(p)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert set(codes) <= {E.hipErrorInvalidValue}
        for ptr in got:
            hip.hipFree(ptr)
    assert open_fds() == before


def test_free_async_behind_a_slow_host_function_keeps_the_memory(pool):
    """hipFreeAsync enqueued behind a slow host function: the range is not reused (nor its
    bytes changed) until the function has run, even by an allocation on another stream."""
    s, other = hip.hipStreamCreate(), hip.hipStreamCreate()
    gate = threading.Event()
    seen: list[bytes] = []
    ptr = hip.hipMallocFromPoolAsync(MiB // 2, pool, s)
    hip.hipMemset(ptr, 0x5C, MiB // 2)
    # Stream work holds the raw pointer (the API refuses it once hipFreeAsync is called).
    hip.hipLaunchHostFunc(
        s, lambda _: (gate.wait(TIMEOUT), seen.append(ctypes.string_at(ptr, 16))), None
    )
    hip.hipFreeAsync(ptr, s)
    second = hip.hipMallocFromPoolAsync(MiB // 2, pool, other)  # must not be ptr's range
    assert second != ptr
    hip.hipMemsetAsync(second, 0x11, MiB // 2, other)  # not hipMemset: it waits for s
    hip.hipStreamSynchronize(other, timeout=TIMEOUT)
    # The pool (1 MiB) is full until the free runs: no third allocation.
    assert code_of(hip.hipMallocFromPoolAsync, MiB // 2, pool, other) == E.hipErrorOutOfMemory
    gate.set()
    hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    assert seen == [b"\x5c" * 16]
    third = hip.hipMallocFromPoolAsync(MiB // 2, pool, other)
    assert third == ptr
    for p in (second, third):
        hip.hipFreeAsync(p, other)
    hip.hipStreamSynchronize(other, timeout=TIMEOUT)
    hip.hipStreamDestroy(s)
    hip.hipStreamDestroy(other)


def _child_uses_parent_pool(pool, ptr: int) -> list[str]:
    out = []
    for fn, args in (
        (hip.hipMallocFromPoolAsync, (4096, pool, None)),
        (hip.hipFreeAsync, (ptr, None)),
        (hip.hipFree, (ptr,)),
        (hip.hipMemPoolExportToShareableHandle, (pool, PFD, 0)),
        (hip.hipMemPoolTrimTo, (pool, 0)),
    ):
        try:
            fn(*args)
            out.append("ok")
        except hip.HipError as exc:
            out.append(exc.code.name)
    mine = hip.hipMallocAsync(4096, None)  # the child's own default pool works
    hip.hipFreeAsync(mine, None)
    hip.hipDeviceSynchronize(timeout=TIMEOUT)
    return out


def test_a_forked_child_cannot_free_or_export_its_parents_pool_memory(pool):
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    hip.hipMemset(ptr, 7, 4096)
    out = in_fork(_child_uses_parent_pool, pool, ptr, timeout=TIMEOUT)
    assert all(code != "ok" for code in out), out
    assert bytes(hip.asarray(ptr, 4)) == b"\7" * 4  # untouched by the child
    hip.hipFree(ptr)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


# -- memory: small allocations add up -----------------------------------------------------------


def test_many_small_pool_allocations_are_checked_against_the_memory_left(pool, monkeypatch):
    """A memfd's tmpfs has no size limit: past the memory, posix_fallocate wakes the OOM killer
    rather than failing.  Only reservations of 16 MiB or more were checked against the memory
    left, so a loop of smaller pool allocations was never checked.  Here the machine is made
    to look small (24 MiB left, less what the pool holds; the only thing patched is that
    probe of the machine): the allocations must end in hipErrorOutOfMemory within 16 MiB of
    that, having committed no more than 40 MiB of real memory."""
    from hipipc import memfd

    big = hip.hipMemPoolCreate(props(max_size=64 * MiB))
    budget = 24 * MiB
    # big.used, not the attribute call: reserve runs under the pool's lock.
    monkeypatch.setattr(memfd, "available_memory", lambda: max(0, budget - big.used))
    got: list[int] = []
    try:
        with pytest.raises(hip.HipError) as info:
            for _ in range(6):  # 6 x 8 MiB: past the budget plus 16 MiB
                got.append(hip.hipMallocFromPoolAsync(8 * MiB, big, None))
        assert info.value.code == E.hipErrorOutOfMemory
        assert len(got) * 8 * MiB <= budget + 16 * MiB
    finally:
        for ptr in got:
            hip.hipFree(ptr)
        hip.hipMemPoolDestroy(big)
