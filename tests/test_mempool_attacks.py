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


def test_free_async_behind_a_slow_host_function_keeps_the_memory(pool, monkeypatch):
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
    # The pool (1 MiB) is full until the free runs: no third allocation (after a short wait
    # for the queued free).
    monkeypatch.setattr(poolcore, "REUSE_WAIT", 0.2)
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


# -- the table under a hostile writer, the allocation cap, kill -9 (attacks that held) ---------


def test_a_peer_tearing_table_entries_never_yields_a_wrong_pointer(pool):
    """Another process holding the descriptor rewrites the entry of a live allocation in a
    loop: byte by byte (torn), with another size, an offset past the end or over the table.
    Every import meanwhile either returns the true pointer or fails with
    hipErrorInvalidValue; none crashes or maps anything else."""
    ptr = hip.hipMallocFromPoolAsync(8192, pool, None)
    data = bytes(hip.hipMemPoolExportPointer(ptr))
    _, _, slot, off, size, serial, _, _ = poolcore._EXPORT.unpack(data)
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    at = poolcore._TABLE_OFFSET + slot * poolcore._ENTRY.size
    writer = run_python_bg(
        """
        import os, sys, time, struct
        fd, at, off, size, serial = map(int, sys.argv[1:6])
        good = struct.pack("<QQQQ", off, size, serial, 1)
        bad = [struct.pack("<QQQQ", off, size + 1, serial, 1),
               struct.pack("<QQQQ", 1 << 40, size, serial, 1),
               struct.pack("<QQQQ", 4096, size, serial, 1),
               bytes(32)]
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for b in bad:
                for i in range(0, 32, 4):      # torn: a word at a time
                    os.pwrite(fd, b[i:i + 4], at + i)
                os.pwrite(fd, good, at)
        """,
        fd,
        at,
        off,
        size,
        serial,
    )
    ok = refused = 0
    try:
        while writer.poll() is None:
            try:
                mine = hip.hipMemPoolImportPointer(imported, data)
            except hip.HipError as exc:
                assert exc.code == E.hipErrorInvalidValue
                refused += 1
                continue
            assert mine - imported._mapping.addr == off  # the true range, nothing else
            hip.hipFree(mine)
            ok += 1
        assert writer.wait(TIMEOUT) == 0, writer.stderr.read().decode()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(TIMEOUT)
        writer.stderr.close()
        os.close(fd)
        hip.hipMemPoolDestroy(imported)
        hip.hipFree(ptr)
    assert ok + refused > 0


def run_python_bg(code: str, *args: int):
    import subprocess
    import sys
    import textwrap

    from _proc import child_env

    fds = [a for a in args[:1]]
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        pass_fds=fds,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_the_allocation_cap_is_out_of_memory_and_frees_make_room():
    """An IPC pool's table holds 16384 live allocations: the next is hipErrorOutOfMemory
    naming the limit; a free makes room again (its slot is reused, the pool stays sound)."""
    big = hip.hipMemPoolCreate(props(max_size=(poolcore.CAPACITY + 8) * 4096))
    got: list[int] = []
    try:
        for _ in range(poolcore.CAPACITY):
            got.append(hip.hipMallocFromPoolAsync(1, big, None))
        with pytest.raises(hip.HipError) as info:
            hip.hipMallocFromPoolAsync(1, big, None)
        assert info.value.code == E.hipErrorOutOfMemory
        assert str(poolcore.CAPACITY) in str(info.value)
        hip.hipFree(got.pop(100))
        got.append(hip.hipMallocFromPoolAsync(1, big, None))
        data = hip.hipMemPoolExportPointer(got[-1])
        assert poolcore._EXPORT.unpack(bytes(data))[2] < poolcore.CAPACITY
    finally:
        for ptr in got:
            hip.hipFree(ptr)
        hip.hipMemPoolDestroy(big)


def test_an_importer_killed_mid_import_leaves_no_lease_behind(pool):
    """A child imports and frees the same pointer in a loop and is killed with SIGKILL at an
    arbitrary point: whatever it held, its leases die with it, so after the exporter frees
    the allocation the range is reused at once."""
    import signal
    import time

    ptr = hip.hipMallocFromPoolAsync(64 * 1024, pool, None)
    data = bytes(hip.hipMemPoolExportPointer(ptr))
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    child = run_python_bg(
        """
        import os, sys
        import hipipc as hip
        fd = int(sys.argv[1])
        pool = hip.hipMemPoolImportFromShareableHandle(fd, 1, 0)
        data = bytes.fromhex(sys.argv[2])
        os.write(2, b"r")
        while True:
            hip.hipFree(hip.hipMemPoolImportPointer(pool, data))
        """,
        fd,
        data.hex(),  # type: ignore[arg-type]
    )
    try:
        assert child.stderr.read(1) == b"r"
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        assert child.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(TIMEOUT)
        child.stderr.close()
        os.close(fd)
    hip.hipFree(ptr)
    again = hip.hipMallocFromPoolAsync(64 * 1024, pool, None)
    assert again == ptr  # no lease outlived the importer
    hip.hipFree(again)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def _nothing() -> int:
    return 0


def test_a_forked_childs_exit_does_not_drop_the_parents_leases(pool):
    """The importer's leases are OFD locks on a description a forked child shares: the
    child's exit (it closes its copies) must not release them."""
    ptr = hip.hipMallocFromPoolAsync(4096, pool, None)
    fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    imported = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
    os.close(fd)
    mine = hip.hipMemPoolImportPointer(imported, hip.hipMemPoolExportPointer(ptr))
    assert in_fork(_nothing, timeout=TIMEOUT) == 0
    hip.hipFree(ptr)  # the exporter frees first: the range stays the importer's
    other = hip.hipMallocFromPoolAsync(4096, pool, None)
    assert other != ptr
    hip.hipFree(mine)
    hip.hipMemPoolDestroy(imported)
    hip.hipFree(other)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def test_the_release_threshold_counts_the_live_memory_too():
    """CUDA/HIP: the release threshold is the *reserved* memory (live allocations included) a
    pool holds on to; beyond it, freed memory goes back.  The pool kept the threshold's worth
    of freed memory on top of its live allocations instead (as hipMemPoolTrimTo does not)."""
    p = hip.hipMemPoolCreate(props(max_size=8 * MiB))
    try:
        hip.hipMemPoolSetAttribute(p, A.hipMemPoolAttrReleaseThreshold, 2 * MiB)
        ptrs = [hip.hipMallocFromPoolAsync(MiB, p, None) for _ in range(4)]
        hip.hipFree(ptrs.pop())
        # 3 MiB live, above the threshold: nothing freed is kept.
        assert hip.hipMemPoolGetAttribute(p, A.hipMemPoolAttrReservedMemCurrent) == 3 * MiB
        hip.hipFree(ptrs.pop())
        hip.hipFree(ptrs.pop())
        # 1 MiB live: 1 MiB of freed memory is kept, reserving the threshold's 2 MiB.
        assert hip.hipMemPoolGetAttribute(p, A.hipMemPoolAttrReservedMemCurrent) == 2 * MiB
        hip.hipFree(ptrs.pop())
        assert hip.hipMemPoolGetAttribute(p, A.hipMemPoolAttrReservedMemCurrent) == 2 * MiB
    finally:
        hip.hipMemPoolDestroy(p)


# -- reuse in stream order --------------------------------------------------------------------


def test_malloc_right_after_free_async_on_one_stream_reuses_the_memory(pool):
    """CUDA: memory freed with cudaFreeAsync is reusable by the next cudaMallocAsync in the
    same stream's order.  A pool of exactly one allocation's size, allocated and freed on one
    stream 200 times: every allocation must succeed (half failed with hipErrorOutOfMemory,
    racing the stream thread that runs the free)."""
    s = hip.hipStreamCreate()
    try:
        for _ in range(200):
            ptr = hip.hipMallocFromPoolAsync(MiB, pool, s)
            hip.hipMemsetAsync(ptr, 1, MiB, s)
            hip.hipFreeAsync(ptr, s)
        hip.hipStreamSynchronize(s, timeout=TIMEOUT)
    finally:
        hip.hipStreamDestroy(s)
    assert hip.hipMemPoolGetAttribute(pool, A.hipMemPoolAttrUsedMemCurrent) == 0


def test_waiting_for_queued_frees_is_bounded_and_follows_the_reuse_switch(pool, monkeypatch):
    """The wait for a queued free is bounded (a stream stuck behind a host function that
    never returns gives hipErrorOutOfMemory, not a hang), skipped when
    hipMemPoolReuseAllowInternalDependencies is off, and never done on a stream's thread."""
    import time

    monkeypatch.setattr(poolcore, "REUSE_WAIT", 2.0)
    s = hip.hipStreamCreate()
    gate = threading.Event()
    ptr = hip.hipMallocFromPoolAsync(MiB, pool, s)
    hip.hipLaunchHostFunc(s, lambda _: gate.wait(TIMEOUT), None)
    hip.hipFreeAsync(ptr, s)
    try:
        t0 = time.monotonic()
        assert code_of(hip.hipMallocFromPoolAsync, MiB, pool, None) == E.hipErrorOutOfMemory
        assert 1.9 < time.monotonic() - t0 < TIMEOUT
        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolReuseAllowInternalDependencies, 0)
        t0 = time.monotonic()
        assert code_of(hip.hipMallocFromPoolAsync, MiB, pool, None) == E.hipErrorOutOfMemory
        assert time.monotonic() - t0 < 1.5  # no wait (a loaded machine: a loose bound)
        hip.hipMemPoolSetAttribute(pool, A.hipMemPoolReuseAllowInternalDependencies, 1)
        other = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
        codes: list[str] = []

        def on_stream(_):
            try:
                hip.hipMallocFromPoolAsync(MiB, pool, None)
                codes.append("ok")
            except hip.HipError as exc:
                codes.append(exc.code.name)

        t0 = time.monotonic()
        hip.hipLaunchHostFunc(other, on_stream, None)
        hip.hipStreamSynchronize(other, timeout=TIMEOUT)
        assert codes == ["hipErrorOutOfMemory"]
        assert time.monotonic() - t0 < TIMEOUT
        hip.hipStreamDestroy(other)
    finally:
        gate.set()
        hip.hipStreamSynchronize(s, timeout=TIMEOUT)
        hip.hipStreamDestroy(s)
    again = hip.hipMallocFromPoolAsync(MiB, pool, None)  # the free ran: room again
    hip.hipFree(again)


def test_pool_calls_at_the_descriptor_limit_are_out_of_memory_and_leak_nothing():
    """At RLIMIT_NOFILE (soft = hard, nothing to raise): creating a pool and exporting one are
    hipErrorOutOfMemory naming the limit, and no descriptor is left behind."""
    out = run_python(
        """
        import os, resource
        import hipipc as hip
        PFD = hip.hipMemHandleTypePosixFileDescriptor
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1, location=hip.hipMemLocation(1, 0),
                                maxSize=1 << 20)
        pool = hip.hipMemPoolCreate(p)
        n = len(os.listdir("/proc/self/fd")) + 4
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        fill = []
        try:
            while True:
                fill.append(os.dup(0))
        except OSError:
            pass
        last = fill.pop()
        os.close(last)  # one free slot: listing /proc/self/fd needs it
        before = set(os.listdir("/proc/self/fd"))
        fill.append(os.dup(0))
        for call in (lambda: hip.hipMemPoolCreate(p),
                     lambda: hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)):
            try:
                call()
                print("succeeded")
            except hip.HipError as exc:
                print(exc.code.name, "RLIMIT_NOFILE" in str(exc))
        os.close(fill.pop())
        print(set(os.listdir("/proc/self/fd")) == before)
        for f in fill:
            os.close(f)
        hip.hipMemPoolDestroy(pool)
        """,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["hipErrorOutOfMemory", "True"] * 2 + ["True"]


def test_more_hostile_descriptors_are_invalid_value_and_leak_nothing():
    """Besides those of test_mempool: a socket, /dev/zero, an O_PATH descriptor of a real
    pool, a sealed memfd smaller than a header, and one with a header claiming a huge table."""
    import socket

    a, b = socket.socketpair()
    zero = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
    pool = hip.hipMemPoolCreate(props())
    real = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
    opath = os.open(f"/proc/self/fd/{real}", os.O_PATH | os.O_CLOEXEC)
    tiny = os.memfd_create("tiny", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(tiny, 16)
    os.pwrite(tiny, b"hipipcMP", 0)
    fcntl.fcntl(
        tiny, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    )
    huge = forged_pool()
    header = poolcore._HEADER.pack(
        b"hipipcMP", 1, 1 << 31, 0, os.fstat(huge).st_size, poolcore._DATA_OFFSET, bytes(16)
    )
    os.pwrite(huge, header, 0)
    fds = [a.fileno(), zero, opath, tiny, huge]
    try:
        before = open_fds()
        for fd in fds:
            code = code_of(hip.hipMemPoolImportFromShareableHandle, fd, PFD, 0)
            assert code == E.hipErrorInvalidValue, fd
        assert open_fds() == before
    finally:
        a.close()
        b.close()
        for fd in fds[1:] + [real]:
            os.close(fd)
        hip.hipMemPoolDestroy(pool)


def test_malloc_async_allocates_from_the_streams_device(monkeypatch):
    """CUDA/HIP: "The allocation comes from the memory pool associated with the stream's
    device" -- not the current device's (the null stream: the current device's)."""
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "2")
    hip.hipSetDevice(1)
    s1 = hip.hipStreamCreate()
    hip.hipSetDevice(0)
    try:
        ptr = hip.hipMallocAsync(100, s1)
        assert hip.hipPointerGetAttributes(ptr).device == 1
        pool1 = hip.hipDeviceGetMemPool(1)
        assert hip.hipMemPoolGetAttribute(pool1, A.hipMemPoolAttrUsedMemCurrent) == 4096
        hip.hipFreeAsync(ptr, s1)
        ptr = hip.hipMallocAsync(100, None)
        assert hip.hipPointerGetAttributes(ptr).device == 0
        hip.hipFreeAsync(ptr, None)
        hip.hipDeviceSynchronize(timeout=TIMEOUT)
        hip.hipSetDevice(1)
        hip.hipDeviceSynchronize(timeout=TIMEOUT)
    finally:
        hip.hipSetDevice(0)
        hip.hipStreamDestroy(s1)


def test_a_forked_child_exiting_normally_leaves_the_parents_pool_alone():
    """A child forked with pools, allocations, an import and a queued free runs the
    interpreter's exit (atexit hooks, the exit rule) and exits 0; the parent's pool, its
    contents and its import are untouched, and the parent then frees everything."""
    out = run_python(
        """
        import os, sys, threading
        import hipipc as hip
        PFD = hip.hipMemHandleTypePosixFileDescriptor
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1, location=hip.hipMemLocation(1, 0),
                                maxSize=1 << 22)
        pool = hip.hipMemPoolCreate(p)
        a = hip.hipMallocFromPoolAsync(4096, pool, None)
        b = hip.hipMallocFromPoolAsync(4096, pool, None)
        hip.hipMemset(a, 0x61, 4096)
        fd = hip.hipMemPoolExportToShareableHandle(pool, PFD, 0)
        imp = hip.hipMemPoolImportFromShareableHandle(fd, PFD, 0)
        os.close(fd)
        mine = hip.hipMemPoolImportPointer(imp, hip.hipMemPoolExportPointer(a))
        s = hip.hipStreamCreate()
        gate = threading.Event()
        hip.hipLaunchHostFunc(s, lambda _: gate.wait(30), None)
        hip.hipFreeAsync(b, s)
        pid = os.fork()
        if pid == 0:
            x = hip.hipMallocAsync(100, None)   # the child's own default pool
            hip.hipMemset(x, 1, 100)
            sys.exit(0)                          # normal exit: atexit, exit rule
        _, status = os.waitpid(pid, 0)
        gate.set()
        hip.hipStreamSynchronize(s, timeout=30)
        ok = bytes(hip.asarray(mine, 4)) == b"aaaa"
        hip.hipFree(a)                           # the exporter frees before the importer
        again = hip.hipMallocFromPoolAsync(4096, pool, None)
        held = again != a                        # the parent's lease survived the child
        hip.hipFree(mine)
        hip.hipFree(again)
        hip.hipMemPoolDestroy(imp)
        hip.hipMemPoolDestroy(pool)
        print(os.waitstatus_to_exitcode(status), ok, held)
        """,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["0", "True", "True"]


def test_an_exporter_killed_mid_allocation_leaves_the_importers_memory_intact():
    """An exporter allocates, fills, exports and frees in a loop and is killed with SIGKILL
    at an arbitrary point while this process imports: every import already made keeps its
    contents; export data still queued imports or is refused with hipErrorInvalidValue;
    nothing hangs and no descriptor is left."""
    import signal
    import socket
    import subprocess
    import sys
    import textwrap
    import time

    from _proc import child_env

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = """
        import socket, sys
        import hipipc as hip
        sock = socket.socket(fileno=int(sys.argv[1]))
        p = hip.hipMemPoolProps(allocType=1, handleTypes=1, location=hip.hipMemLocation(1, 0),
                                maxSize=1 << 24)
        pool = hip.hipMemPoolCreate(p)
        fd = hip.hipMemPoolExportToShareableHandle(pool, 1, 0)
        hip.send_fds(sock, [fd], b"p", timeout=60)
        live = []
        k = 0
        while True:
            k = (k + 1) % 250
            ptr = hip.hipMallocFromPoolAsync(1 << 16, pool, None)
            hip.hipMemset(ptr, k, 1 << 16)
            sock.sendall(bytes(hip.hipMemPoolExportPointer(ptr)) + bytes([k]))
            live.append(ptr)
            if len(live) > 8:
                hip.hipFree(live.pop(0))
        """
    before = open_fds()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    imported = None
    mine: list[tuple[int, int]] = []
    try:
        _, fds = hip.recv_fds(ours, maxfds=1, bufsize=16, timeout=TIMEOUT)
        imported = hip.hipMemPoolImportFromShareableHandle(fds[0], PFD, 0)
        os.close(fds[0])
        ours.settimeout(TIMEOUT)
        buf = b""
        deadline = time.monotonic() + TIMEOUT
        killed = False
        while time.monotonic() < deadline:
            chunk = ours.recv(65 * 64)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 65:
                data, k, buf = buf[:64], buf[64], buf[65:]
                try:
                    mine.append((hip.hipMemPoolImportPointer(imported, data), k))
                except hip.HipError as exc:
                    assert exc.code == E.hipErrorInvalidValue
            if len(mine) >= 40 and not killed:
                proc.send_signal(signal.SIGKILL)
                killed = True
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
        assert len(mine) >= 40
        for ptr, k in mine:  # memory and contents survive the exporter
            assert bytes(hip.asarray(ptr, 1 << 16)) == bytes([k]) * (1 << 16)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()
        ours.close()
        for ptr, _ in mine:
            hip.hipFree(ptr)
        if imported is not None:
            hip.hipMemPoolDestroy(imported)
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}
    assert not left, left
