"""The calls around the IPC calls (issue 12): device queries, peer access, memory queries,
pinned host memory, versions and the last-error calls, each with its success and negative
cases and HIP's codes (those hip-tests checks).  The README's table of every call is checked
row by row in test_porting_table.py.
"""

from __future__ import annotations

import gc
import os
import pickle
import re
import resource
import threading

import numpy as np
import pytest
from _proc import Exporter, in_fork, store_names

import hipipc as hip
from hipipc.backends.host_device import _statvfs_nearest
from hipipc.store import PAGE_SIZE

E = hip.hipError_t
A = hip.hipDeviceAttribute_t


def code_of(fn, *args, **kwargs) -> E:
    with pytest.raises(hip.HipError) as info:
        fn(*args, **kwargs)
    return info.value.code


@pytest.fixture
def devices(monkeypatch):
    """``devices(n)``: run with ``HIPIPC_HOST_DEVICES=n``; current device and peer access
    are restored at teardown."""

    def use(n: int) -> None:
        monkeypatch.setenv("HIPIPC_HOST_DEVICES", str(n))

    yield use
    hip.device._peers.clear()
    monkeypatch.delenv("HIPIPC_HOST_DEVICES", raising=False)
    hip.hipSetDevice(0)


def test_new_error_codes_have_hips_values():
    assert E.hipErrorPeerAccessAlreadyEnabled == 704
    assert E.hipErrorPeerAccessNotEnabled == 705
    assert E.hipErrorHostMemoryAlreadyRegistered == 712
    assert E.hipErrorHostMemoryNotRegistered == 713
    assert hip.hipGetErrorString(713) == "pointer does not correspond to a registered memory region"


# -- runtime ---------------------------------------------------------------------------


def test_init_and_versions():
    hip.hipInit(0)
    assert code_of(hip.hipInit, 1) == E.hipErrorInvalidValue
    assert hip.hipRuntimeGetVersion() == hip.hipDriverGetVersion() == 60200000
    assert hip.HIP_VERSION // 10**7 == 6


# -- device queries --------------------------------------------------------------------


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith(("model name", "hardware", "cpu model", "uarch")):
                return line.partition(":")[2].strip()
    pytest.skip("no model name in /proc/cpuinfo")


def test_device_properties_are_the_hosts():
    props = hip.hipGetDeviceProperties(0)
    assert isinstance(props, hip.hipDeviceProp_t)
    assert props.name == cpu_model()
    st = _statvfs_nearest(hip.registry.get_registry().backend.store.own_path())
    assert props.totalGlobalMem == st.f_blocks * st.f_frsize
    assert props.multiProcessorCount == len(os.sched_getaffinity(0))
    assert props.unifiedAddressing == 1 and props.canMapHostMemory == 1
    assert props.computeMode == hip.hipComputeModeDefault
    assert (props.pciBusID, props.pciDeviceID, props.major, props.minor) == (0, 0, 9, 0)
    assert props.warpSize == 1 and props.maxThreadsPerBlock == 1024
    assert props.memoryPoolsSupported == 1 and props.managedMemory == 0  # hipipc.mempool
    # A fresh object each call: a caller's edit does not stick.
    props.name = "changed"
    assert hip.hipGetDeviceProperties(0).name == cpu_model()


@pytest.mark.parametrize("bad", [-1, 1, "0", None, True])
def test_device_properties_of_a_missing_device(bad):
    assert code_of(hip.hipGetDeviceProperties, bad) == E.hipErrorInvalidDevice


def test_device_properties_per_device(devices):
    devices(3)
    assert hip.hipGetDeviceProperties(2).name == cpu_model()
    assert code_of(hip.hipGetDeviceProperties, 3) == E.hipErrorInvalidDevice


@pytest.mark.parametrize(
    "attr, field",
    [
        (A.hipDeviceAttributeMultiprocessorCount, "multiProcessorCount"),
        (A.hipDeviceAttributeUnifiedAddressing, "unifiedAddressing"),
        (A.hipDeviceAttributeComputeMode, "computeMode"),
        (A.hipDeviceAttributeMemoryPoolsSupported, "memoryPoolsSupported"),
        (A.hipDeviceAttributeCanMapHostMemory, "canMapHostMemory"),
        (A.hipDeviceAttributeComputeCapabilityMajor, "major"),
        (A.hipDeviceAttributeComputeCapabilityMinor, "minor"),
        (A.hipDeviceAttributeWarpSize, "warpSize"),
        (A.hipDeviceAttributeMaxThreadsPerBlock, "maxThreadsPerBlock"),
        (A.hipDeviceAttributePciBusId, "pciBusID"),
    ],
)
def test_device_attribute_matches_the_property(attr, field):
    assert hip.hipDeviceGetAttribute(attr, 0) == getattr(hip.hipGetDeviceProperties(0), field)
    assert hip.hipDeviceGetAttribute(int(attr), 0) == hip.hipDeviceGetAttribute(attr, 0)


def test_device_attribute_values():
    assert hip.hipDeviceGetAttribute(A.hipDeviceAttributeMaxBlockDimX, 0) == 1024
    assert hip.hipDeviceGetAttribute(A.hipDeviceAttributeMaxTexture1DWidth, 0) == 0
    assert hip.hipDeviceGetAttribute(A.hipDeviceAttributeMemoryPoolSupportedHandleTypes, 0) == 1
    total = hip.hipGetDeviceProperties(0).totalGlobalMem
    assert hip.hipDeviceGetAttribute(A.hipDeviceAttributeTotalGlobalMem, 0) == min(
        total, 2**31 - 1
    )  # clamped to INT_MAX, as HIP does
    assert A.hipDeviceAttributeMultiprocessorCount == 63
    assert A.hipDeviceAttributeMemoryPoolsSupported == 88


@pytest.mark.parametrize("attr", [-1, 9999, 123456, A.hipDeviceAttributeLuid, "x", True])
def test_device_attribute_invalid(attr):
    assert code_of(hip.hipDeviceGetAttribute, attr, 0) == E.hipErrorInvalidValue


def test_device_attribute_invalid_device():
    assert (
        code_of(hip.hipDeviceGetAttribute, A.hipDeviceAttributeWarpSize, -1)
        == E.hipErrorInvalidDevice
    )
    assert (
        code_of(hip.hipDeviceGetAttribute, A.hipDeviceAttributeWarpSize, 1)
        == E.hipErrorInvalidDevice
    )


def test_total_mem_capability_name():
    props = hip.hipGetDeviceProperties(0)
    assert hip.hipDeviceTotalMem(0) == props.totalGlobalMem
    assert hip.hipDeviceComputeCapability(0) == (9, 0)
    assert hip.hipDeviceGetName(0) == props.name
    for fn in (hip.hipDeviceTotalMem, hip.hipDeviceComputeCapability, hip.hipDeviceGetName):
        assert code_of(fn, 5) == E.hipErrorInvalidDevice


# -- peer access -----------------------------------------------------------------------


def test_can_access_peer(devices):
    devices(3)
    assert hip.hipDeviceCanAccessPeer(0, 1) == hip.hipDeviceCanAccessPeer(2, 0) == 1
    assert hip.hipDeviceCanAccessPeer(1, 1) == 0
    assert code_of(hip.hipDeviceCanAccessPeer, 0, 3) == E.hipErrorInvalidDevice
    assert code_of(hip.hipDeviceCanAccessPeer, -1, 0) == E.hipErrorInvalidDevice


def test_one_device_has_no_peer():
    assert hip.hipDeviceCanAccessPeer(0, 0) == 0
    assert code_of(hip.hipDeviceEnablePeerAccess, 0, 0) == E.hipErrorInvalidDevice


def test_enable_disable_peer_access(devices):
    """hip-tests' Unit_hipDeviceEnablePeerAccess_negative / DisablePeerAccess_negative."""
    devices(2)
    hip.hipSetDevice(0)
    for bad in (-1, 2):
        assert code_of(hip.hipDeviceEnablePeerAccess, bad, 0) == E.hipErrorInvalidDevice
        assert code_of(hip.hipDeviceDisablePeerAccess, bad) == E.hipErrorInvalidDevice
    assert code_of(hip.hipDeviceEnablePeerAccess, 0, -1) == E.hipErrorInvalidValue
    assert code_of(hip.hipDeviceEnablePeerAccess, 1, 1) == E.hipErrorInvalidValue
    assert code_of(hip.hipDeviceDisablePeerAccess, 1) == E.hipErrorPeerAccessNotEnabled
    hip.hipDeviceEnablePeerAccess(1, 0)
    assert code_of(hip.hipDeviceEnablePeerAccess, 1, 0) == E.hipErrorPeerAccessAlreadyEnabled
    # Per current device: device 1 -> 0 is its own pair.
    hip.hipSetDevice(1)
    assert code_of(hip.hipDeviceDisablePeerAccess, 0) == E.hipErrorPeerAccessNotEnabled
    hip.hipDeviceEnablePeerAccess(0, 0)
    hip.hipDeviceDisablePeerAccess(0)
    hip.hipSetDevice(0)
    hip.hipDeviceDisablePeerAccess(1)
    assert code_of(hip.hipDeviceDisablePeerAccess, 1) == E.hipErrorPeerAccessNotEnabled


def test_peer_access_is_per_thread_device_but_per_process(devices):
    devices(2)
    hip.hipDeviceEnablePeerAccess(1, 0)
    seen = []
    t = threading.Thread(target=lambda: seen.append(code_of(hip.hipDeviceEnablePeerAccess, 1, 0)))
    t.start()
    t.join(30)
    assert seen == [E.hipErrorPeerAccessAlreadyEnabled]
    # A forked child starts a fresh runtime: nothing enabled there.
    assert in_fork(lambda: hip.hipDeviceEnablePeerAccess(1, 0)) is None


# -- reset -----------------------------------------------------------------------------


def test_device_reset_frees_closes_and_revokes(devices):
    devices(2)
    with Exporter([4096]) as exporter:
        imported = hip.hipIpcOpenMemHandle(exporter.handles[0])
        hip.hipIpcOpenMemHandle(exporter.handles[0])  # two opens: reset closes both
        ptr = hip.hipMalloc(8192)
        mine = hip.hipIpcGetMemHandle(ptr).segment_name
        hip.hipSetDevice(1)
        other = hip.hipMalloc(100)  # on device 1: untouched by a reset of device 0
        hip.hipSetDevice(0)
        hip.hipDeviceEnablePeerAccess(1, 0)
        assert mine in store_names()
        hip.hipDeviceReset()
        for p in (ptr, imported):
            assert code_of(hip.hipPointerGetAttributes, p) == E.hipErrorInvalidValue
        assert code_of(hip.hipFree, ptr) == E.hipErrorInvalidValue
        assert mine not in store_names()  # revoked
        assert hip.IpcMemHandle(exporter.handles[0]).segment_name in store_names()
        hip.hipDeviceEnablePeerAccess(1, 0)  # cleared by the reset: enabling works again
        assert hip.hipPointerGetAttributes(other).device == 1
        hip.hipFree(other)


# -- memory queries --------------------------------------------------------------------


def test_mem_get_info_is_the_stores_file_system():
    free, total = hip.hipMemGetInfo()
    st = _statvfs_nearest(hip.registry.get_registry().backend.store.own_path())
    assert total == st.f_blocks * st.f_frsize
    assert 0 <= free <= total


def test_statvfs_of_a_store_not_created_yet(tmp_path):
    missing = tmp_path / "not" / "yet" / "store"
    assert _statvfs_nearest(str(missing)) == os.statvfs(tmp_path)


def test_pointer_attributes_of_own_memory():
    size = 10000
    ptr = hip.hipMalloc(size)
    try:
        a = hip.hipPointerGetAttributes(ptr)
        assert a.type == hip.hipMemoryTypeDevice == 2
        assert (a.device, a.devicePointer, a.hostPointer, a.isManaged) == (0, ptr, 0, 0)
        assert (a.allocationBase, a.allocationSize) == (ptr, size)
        inner = hip.hipPointerGetAttributes(ptr + 100)
        assert inner.devicePointer == ptr + 100 and inner.allocationBase == ptr
        assert hip.hipPointerGetAttributes(ptr + size - 1).devicePointer == ptr + size - 1
        assert code_of(hip.hipPointerGetAttributes, ptr + size) == E.hipErrorInvalidValue
    finally:
        hip.hipFree(ptr)
    assert code_of(hip.hipPointerGetAttributes, ptr) == E.hipErrorInvalidValue


@pytest.mark.parametrize("bad", [None, 0, np.zeros(16), bytearray(8), "x"])
def test_pointer_attributes_negative(bad):
    assert code_of(hip.hipPointerGetAttributes, bad) == E.hipErrorInvalidValue


def test_pointer_attributes_of_an_import(devices):
    devices(2)
    with Exporter([5000]) as exporter:
        hip.hipSetDevice(1)
        ptr = hip.hipIpcOpenMemHandle(exporter.handles[0])
        a = hip.hipPointerGetAttributes(ptr + 7)
        assert a.type == hip.hipMemoryTypeDevice
        assert a.device == 0  # the exporter's device, not this thread's current one
        assert (a.devicePointer, a.hostPointer, a.allocationBase, a.allocationSize) == (
            ptr + 7,
            0,
            ptr,
            5000,
        )
        hip.hipIpcCloseMemHandle(ptr)
        assert code_of(hip.hipPointerGetAttributes, ptr) == E.hipErrorInvalidValue


def test_memcpy_peer(devices, stream):
    devices(2)
    src = hip.hipMalloc(4096)
    hip.hipSetDevice(1)
    dst = hip.hipMalloc(4096)
    try:
        data = np.arange(4096, dtype=np.uint8)
        hip.hipMemcpy(src, data, 4096, hip.hipMemcpyHostToDevice)
        hip.hipMemcpyPeer(dst, 1, src, 0, 4096)
        assert (hip.asarray(dst, 4096) == data).all()
        hip.hipMemset(dst, 0, 4096)
        s = stream()
        hip.hipMemcpyPeerAsync(dst + 96, 1, src, 0, 4000, s)
        hip.hipStreamSynchronize(s, timeout=30)
        assert (hip.asarray(dst + 96, 4000) == data[:4000]).all()
        for args in ((dst, 2, src, 0, 16), (dst, 1, src, -1, 16)):
            assert code_of(hip.hipMemcpyPeer, *args) == E.hipErrorInvalidDevice
            assert code_of(hip.hipMemcpyPeerAsync, *args) == E.hipErrorInvalidDevice
        assert code_of(hip.hipMemcpyPeer, dst, 1, src, 0, 4097) == E.hipErrorInvalidValue
        assert code_of(hip.hipMemcpyPeer, dst, 1, data, 0, 16) == E.hipErrorInvalidValue
    finally:
        hip.hipFree(dst)
        hip.hipFree(src)


# -- pinned host memory ----------------------------------------------------------------


def locked_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmLck:\s+(\d+)", f.read()).group(1))


def test_host_malloc_is_a_host_buffer():
    nbytes = 3 * PAGE_SIZE + 5
    buf = hip.hipHostMalloc(nbytes, hip.hipHostMallocMapped)
    try:
        assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.size == nbytes
        addr = buf.ctypes.data
        assert addr % PAGE_SIZE == 0 and buf.flags.writeable
        buf[:] = np.arange(nbytes) % 251
        ptr = hip.hipMalloc(nbytes)
        try:
            hip.hipMemcpy(ptr, buf, nbytes, hip.hipMemcpyHostToDevice)
            back = hip.hipHostMalloc(nbytes)
            hip.hipMemcpy(back, ptr, nbytes, hip.hipMemcpyDeviceToHost)
            assert (back == buf).all() and bytes(memoryview(back)[:3]) == b"\0\1\2"
            hip.hipHostFree(back)
        finally:
            hip.hipFree(ptr)
        a = hip.hipPointerGetAttributes(buf)
        assert a.type == hip.hipMemoryTypeHost == 1
        assert (a.hostPointer, a.devicePointer, a.device) == (addr, addr, 0)
        assert (a.allocationFlags, a.allocationBase, a.allocationSize) == (
            hip.hipHostMallocMapped,
            addr,
            nbytes,
        )
        assert hip.hipPointerGetAttributes(addr + 10).hostPointer == addr + 10
        assert hip.hipHostGetDevicePointer(buf, 0) == addr
        assert hip.hipHostGetDevicePointer(addr + 7) == addr + 7
        assert code_of(hip.hipHostGetDevicePointer, buf, 1) == E.hipErrorInvalidValue
        assert code_of(hip.hipHostFree, addr + 1) == E.hipErrorInvalidValue
    finally:
        hip.hipHostFree(buf)
    assert code_of(hip.hipHostFree, buf) == E.hipErrorInvalidValue
    assert code_of(hip.hipPointerGetAttributes, buf) == E.hipErrorInvalidValue
    assert code_of(hip.hipHostGetDevicePointer, buf) == E.hipErrorInvalidValue
    # The array itself keeps its memory mapped after hipHostFree: no crash on a late read.
    assert buf[1] == 1


def test_host_malloc_negative():
    assert hip.hipHostMalloc(0) is None
    hip.hipHostFree(None)
    hip.hipHostFree(0)
    for flags in (0x8, -1, 1 << 40, hip.hipHostMallocCoherent | hip.hipHostMallocNonCoherent):
        assert code_of(hip.hipHostMalloc, 64, flags) == E.hipErrorInvalidValue
    assert code_of(hip.hipHostMalloc, -1) == E.hipErrorInvalidValue
    ptr = hip.hipMalloc(64)
    try:
        assert code_of(hip.hipHostFree, ptr) == E.hipErrorInvalidValue
        assert code_of(hip.hipHostGetDevicePointer, ptr) == E.hipErrorInvalidValue
    finally:
        hip.hipFree(ptr)
    assert code_of(hip.hipHostFree, np.zeros(8)) == E.hipErrorInvalidValue


def test_host_malloc_is_locked_in_ram(monkeypatch):
    before = locked_kib()
    buf = hip.hipHostMalloc(64 * PAGE_SIZE)
    try:
        if os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < (1 << 20):
            pytest.skip("RLIMIT_MEMLOCK too low to see the lock")
        assert locked_kib() - before >= 64 * PAGE_SIZE // 1024
    finally:
        hip.hipHostFree(buf)
        del buf
    monkeypatch.setenv("HIPIPC_PIN", "off")
    before = locked_kib()
    buf = hip.hipHostMalloc(64 * PAGE_SIZE)
    assert locked_kib() == before
    hip.hipHostFree(buf)
    monkeypatch.setenv("HIPIPC_PIN", "sometimes")
    assert code_of(hip.hipHostMalloc, 64) == E.hipErrorInvalidValue


def _pin_without_privilege(policy: str) -> str:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    os.environ["HIPIPC_PIN"] = policy
    try:
        buf = hip.hipHostMalloc(PAGE_SIZE)
    except hip.HipError as exc:
        return exc.code.name
    buf[:] = 7
    hip.hipHostFree(buf)
    return "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_a_failed_lock_falls_back_or_raises():
    assert in_fork(_pin_without_privilege, "try") == "ok"
    assert in_fork(_pin_without_privilege, "require") == "hipErrorOutOfMemory"


def test_host_register():
    ba = bytearray(3 * PAGE_SIZE)
    hip.hipHostRegister(ba, len(ba), hip.hipHostRegisterMapped)
    try:
        addr = np.frombuffer(ba, np.uint8).ctypes.data
        a = hip.hipPointerGetAttributes(ba)
        assert (a.type, a.hostPointer, a.allocationFlags, a.allocationSize) == (
            hip.hipMemoryTypeHost,
            addr,
            hip.hipHostRegisterMapped,
            len(ba),
        )
        assert hip.hipHostGetDevicePointer(addr + 5) == addr + 5
        # Registered memory is used as any host buffer; it cannot be resized meanwhile.
        ptr = hip.hipMalloc(100)
        hip.hipMemset(ptr, 9, 100)
        hip.hipMemcpy(ba, ptr, 100, hip.hipMemcpyDeviceToHost)
        hip.hipFree(ptr)
        assert ba[:100] == b"\x09" * 100
        with pytest.raises(BufferError):
            ba.extend(b"x")
        assert code_of(hip.hipHostRegister, ba, 10) == E.hipErrorHostMemoryAlreadyRegistered
        assert (
            code_of(hip.hipHostRegister, memoryview(ba)[100:], 10)
            == E.hipErrorHostMemoryAlreadyRegistered
        )
        assert code_of(hip.hipHostFree, ba) == E.hipErrorInvalidValue
        assert code_of(hip.hipHostUnregister, addr + 1) == E.hipErrorHostMemoryNotRegistered
    finally:
        hip.hipHostUnregister(ba)
    assert code_of(hip.hipHostUnregister, ba) == E.hipErrorHostMemoryNotRegistered
    assert code_of(hip.hipPointerGetAttributes, ba) == E.hipErrorInvalidValue
    gc.collect()  # tracebacks of the failed calls above hold buffers of ba in their frames
    ba.extend(b"x")  # released


def test_host_register_negative():
    ba = bytearray(100)
    for args in (
        (None, 10),
        (12345, 10),
        (ba, 0),
        (ba, 101),
        (ba, -1),
        (b"readonly", 4),
        (ba, 10, 0x10),
        (ba, 10, -1),
        (np.zeros((4, 4))[:, 0], 8),
    ):
        assert code_of(hip.hipHostRegister, *args) == E.hipErrorInvalidValue, args
    data = b"read-only but registered"
    hip.hipHostRegister(data, len(data), hip.hipHostRegisterReadOnly)
    hip.hipHostUnregister(data)
    assert code_of(hip.hipHostUnregister, None) == E.hipErrorInvalidValue
    assert code_of(hip.hipHostUnregister, bytearray(8)) == E.hipErrorHostMemoryNotRegistered
    pinned = hip.hipHostMalloc(64)
    try:
        assert code_of(hip.hipHostRegister, pinned, 64) == E.hipErrorHostMemoryAlreadyRegistered
        assert code_of(hip.hipHostUnregister, pinned) == E.hipErrorHostMemoryNotRegistered
    finally:
        hip.hipHostFree(pinned)


def test_host_memory_in_a_forked_child_is_unknown_there():
    pinned = hip.hipHostMalloc(64)
    try:
        assert (
            in_fork(lambda: code_of(hip.hipPointerGetAttributes, pinned).name)
            == "hipErrorInvalidValue"
        )
    finally:
        hip.hipHostFree(pinned)


# -- the last error --------------------------------------------------------------------


def test_last_error_is_recorded_and_reset():
    hip.hipGetLastError()
    assert hip.hipPeekAtLastError() == E.hipSuccess
    assert code_of(hip.hipFree, 12345) == E.hipErrorInvalidValue
    assert hip.hipGetDeviceCount() >= 1  # a success does not reset it (HIP 6, CUDA)
    assert hip.hipPeekAtLastError() == E.hipErrorInvalidValue
    assert hip.hipPeekAtLastError() == E.hipErrorInvalidValue
    assert code_of(hip.hipSetDevice, 99) == E.hipErrorInvalidDevice
    assert hip.hipGetLastError() == E.hipErrorInvalidDevice  # the last one wins
    assert hip.hipGetLastError() == E.hipSuccess


def test_last_error_is_per_thread_and_covers_every_module():
    hip.hipGetLastError()
    seen = []

    def other():
        seen.append(code_of(hip.hipHostUnregister, bytearray(4)))
        seen.append(hip.hipGetLastError())

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    assert seen == [E.hipErrorHostMemoryNotRegistered] * 2
    assert hip.hipGetLastError() == E.hipSuccess
    code_of(hip.hipIpcOpenMemHandle, bytes(64))
    assert hip.hipGetLastError() == E.hipErrorInvalidValue
    code_of(hip.hipDeviceGetAttribute, A.hipDeviceAttributeWarpSize, 7)
    assert hip.hipGetLastError() == E.hipErrorInvalidDevice


def test_query_results_are_not_errors(gate, stream):
    hip.hipGetLastError()
    s = stream()
    g = gate()
    hip.hipLaunchHostFunc(s, g.wait, 30)
    assert hip.hipStreamQuery(s) == E.hipErrorNotReady
    g.set()
    hip.hipStreamSynchronize(s, timeout=30)
    assert hip.hipPeekAtLastError() == E.hipSuccess


def test_wrapped_functions_are_the_modules_and_pickle_by_name():
    assert hip.hipMalloc is hip.runtime.hipMalloc
    assert hip.hipHostMalloc is hip.hostmem.hipHostMalloc
    assert hip.hipMalloc.__name__ == "hipMalloc" and "hipMalloc(0)" in hip.hipMalloc.__doc__
    assert pickle.loads(pickle.dumps(hip.hipGetDeviceProperties)) is hip.hipGetDeviceProperties


def test_the_device_pointer_of_host_memory_is_a_device_pointer(devices):
    """hip-tests' Unit_hipHostGetDevicePointer_UseCase: a kernel writes through it."""
    devices(1)
    pinned = hip.hipHostMalloc(4096, hip.hipHostMallocMapped)
    res = bytearray(8)
    hip.hipHostRegister(res, 8, 0)
    try:
        for host, n in ((pinned, 4096), (res, 8)):
            d_ptr = hip.hipHostGetDevicePointer(host, 0)
            hip.hipLaunchHostFunc(
                None, lambda p, n=n: hip.asarray(p, n).__setitem__(slice(None), 10), d_ptr
            )
            hip.hipDeviceSynchronize(timeout=30)
            assert bytes(memoryview(host)[:n]) == b"\x0a" * n
            dev = hip.hipMalloc(n)
            hip.hipMemset(dev, 3, n)
            hip.hipMemcpy(d_ptr, dev, n, hip.hipMemcpyDeviceToDevice)  # an int side
            hip.hipFree(dev)
            assert bytes(memoryview(host)[:n]) == b"\x03" * n
            for fn in (hip.hipFree, hip.hipIpcGetMemHandle, hip.hipIpcCloseMemHandle):
                assert code_of(fn, d_ptr) == E.hipErrorInvalidValue
        hip.hipDeviceReset()  # leaves pinned and registered memory alone
        assert hip.hipPointerGetAttributes(pinned).type == hip.hipMemoryTypeHost
    finally:
        hip.hipHostUnregister(res)
        ptr = hip.hipHostGetDevicePointer(pinned)
        hip.hipHostFree(pinned)
    for p in (ptr, np.frombuffer(res, np.uint8).ctypes.data):
        assert code_of(hip.asarray, p, 8) == E.hipErrorInvalidValue
    gc.collect()
    res.extend(b"x")  # unregistered: resizable again


def test_read_only_registration_has_no_device_pointer_use():
    data = b"immutable bytes, must stay so"
    hip.hipHostRegister(data, len(data), hip.hipHostRegisterReadOnly)
    try:
        addr = hip.hipHostGetDevicePointer(data)
        assert code_of(hip.hipMemset, addr, 0, 4) == E.hipErrorInvalidValue
        assert data == b"immutable bytes, must stay so"
    finally:
        hip.hipHostUnregister(data)
