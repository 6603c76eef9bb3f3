"""The README's porting table, row by row: every hip* call hipipc has, with the negative
cases hip-tests checks and HIP's codes (one parametrized test per row), and a check that the
table and the package list the same calls.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
from _proc import Exporter

import hipipc as hip

E = hip.hipError_t
A = hip.hipDeviceAttribute_t
ROOT = Path(__file__).resolve().parent.parent


def code_of(fn, *args, **kwargs) -> E:
    with pytest.raises(hip.HipError) as info:
        fn(*args, **kwargs)
    return info.value.code


# -- the porting table: one row per hip* call, each with its negative cases ---------------

ROWS: dict[str, object] = {}


def row(*names: str):
    def register(fn):
        for name in names:
            ROWS[name] = fn
        return fn

    return register


def expect(code: E, fn, *args, **kwargs) -> None:
    assert code_of(fn, *args, **kwargs) == code, (fn.__name__, args)


@row("hipGetErrorName", "hipGetErrorString")
def _row_error_text(monkeypatch):
    assert hip.hipGetErrorName(E.hipErrorPeerAccessNotEnabled) == "hipErrorPeerAccessNotEnabled"
    assert hip.hipGetErrorName(123456) == "hipErrorUnknown"  # HIP's answer, nothing raised
    assert hip.hipGetErrorString(123456) == "unknown error"


@row("hipGetDeviceCount", "hipInit")
def _row_device_count(monkeypatch):
    assert hip.hipGetDeviceCount() == 1
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "0")  # hip-tests' hipNoGpuTsts
    expect(E.hipErrorNoDevice, hip.hipGetDeviceCount)
    expect(E.hipErrorNoDevice, hip.hipInit, 0)
    monkeypatch.delenv("HIPIPC_HOST_DEVICES")
    expect(E.hipErrorInvalidValue, hip.hipInit, 1)


@row("hipSetDevice", "hipGetDevice")
def _row_set_device(monkeypatch):
    for bad in (-1, 1):
        expect(E.hipErrorInvalidDevice, hip.hipSetDevice, bad)
    hip.hipSetDevice(0)
    assert hip.hipGetDevice() == 0


@row("hipDeviceSynchronize", "hipLaunchHostFunc", "hipStreamCreate")
def _row_synchronize(monkeypatch):
    s = hip.hipStreamCreate()
    expect(E.hipErrorInvalidValue, hip.hipLaunchHostFunc, s, "not callable")
    hip.hipLaunchHostFunc(s, lambda: 1 / 0)
    hip.hipStreamDestroy(s)
    expect(E.hipErrorLaunchFailure, hip.hipDeviceSynchronize, timeout=30)
    hip.hipDeviceSynchronize(timeout=30)  # reported once


@row("hipMalloc", "hipFree")
def _row_malloc_free(monkeypatch):
    assert hip.hipMalloc(0) == 0
    expect(E.hipErrorInvalidValue, hip.hipMalloc, -1)
    expect(E.hipErrorOutOfMemory, hip.hipMalloc, 1 << 60)
    ptr = hip.hipMalloc(64)
    expect(E.hipErrorInvalidValue, hip.hipFree, ptr + 1)
    hip.hipFree(ptr)
    expect(E.hipErrorInvalidValue, hip.hipFree, ptr)  # twice
    hip.hipFree(0)


@row("hipMemset", "hipMemsetAsync", "hipMemGetAddressRange")
def _row_memset(monkeypatch):
    ptr = hip.hipMalloc(64)
    try:
        for fn in (hip.hipMemset, hip.hipMemsetAsync):
            expect(E.hipErrorInvalidValue, fn, 0, 1, 8)
            expect(E.hipErrorInvalidValue, fn, ptr, 1, 65)
        s = hip.hipStreamCreate()
        hip.hipStreamDestroy(s)
        expect(E.hipErrorInvalidResourceHandle, hip.hipMemsetAsync, ptr, 1, 8, s)
        assert hip.hipMemGetAddressRange(ptr + 5) == (ptr, 64)
        expect(E.hipErrorNotFound, hip.hipMemGetAddressRange, ptr + 64)
    finally:
        hip.hipFree(ptr)
    expect(E.hipErrorNotFound, hip.hipMemGetAddressRange, ptr)


@row("hipMemcpy", "hipMemcpyAsync")
def _row_memcpy(monkeypatch):
    ptr = hip.hipMalloc(64)
    host = bytearray(64)
    try:
        for fn in (hip.hipMemcpy, hip.hipMemcpyAsync):
            expect(E.hipErrorInvalidMemcpyDirection, fn, ptr, host, 8, 7)
            expect(E.hipErrorInvalidValue, fn, 0, host, 8, hip.hipMemcpyHostToDevice)
            expect(E.hipErrorInvalidValue, fn, ptr, host, 65, hip.hipMemcpyHostToDevice)
        hip.hipMemcpyAsync(host, ptr, 64, hip.hipMemcpyDeviceToHost)
        hip.hipStreamSynchronize(None, timeout=30)
    finally:
        hip.hipFree(ptr)


@row("hipIpcGetMemHandle", "hipIpcOpenMemHandle", "hipIpcCloseMemHandle")
def _row_ipc_memory(monkeypatch):
    """hip-tests' Unit_hipIpcMemAccess_ParameterValidation (+ open in the exporter)."""
    ptr = hip.hipMalloc(1024)
    try:
        expect(E.hipErrorInvalidValue, hip.hipIpcGetMemHandle, 0)
        expect(E.hipErrorInvalidValue, hip.hipIpcGetMemHandle, None)
        handle = hip.hipIpcGetMemHandle(ptr)
        expect(E.hipErrorInvalidValue, hip.hipIpcOpenMemHandle, bytes(64))
        expect(E.hipErrorInvalidValue, hip.hipIpcOpenMemHandle, handle, 123)
        expect(E.hipErrorInvalidContext, hip.hipIpcOpenMemHandle, handle)
        expect(E.hipErrorInvalidValue, hip.hipIpcCloseMemHandle, 0)
        expect(E.hipErrorInvalidValue, hip.hipIpcCloseMemHandle, ptr)
    finally:
        hip.hipFree(ptr)
    with Exporter([64]) as exporter:
        p = hip.hipIpcOpenMemHandle(exporter.handles[0])
        hip.hipIpcCloseMemHandle(p)
        exporter.command("free 0")
        expect(E.hipErrorInvalidResourceHandle, hip.hipIpcOpenMemHandle, exporter.handles[0])


@row("hipStreamCreateWithFlags", "hipStreamDestroy", "hipStreamSynchronize", "hipStreamQuery")
def _row_streams(monkeypatch):
    expect(E.hipErrorInvalidValue, hip.hipStreamCreateWithFlags, 0xFF)
    s = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    assert hip.hipStreamQuery(s) == E.hipSuccess
    hip.hipStreamDestroy(s)
    expect(E.hipErrorInvalidResourceHandle, hip.hipStreamDestroy, s)
    expect(E.hipErrorInvalidResourceHandle, hip.hipStreamDestroy, None)
    expect(E.hipErrorInvalidResourceHandle, hip.hipStreamSynchronize, s)
    expect(E.hipErrorInvalidResourceHandle, hip.hipStreamQuery, s)


@row(
    "hipStreamWaitEvent",
    "hipEventCreate",
    "hipEventRecord",
    "hipEventQuery",
    "hipEventSynchronize",
    "hipEventElapsedTime",
    "hipEventDestroy",
)
def _row_events(monkeypatch):
    ev = hip.hipEventCreate()
    expect(E.hipErrorInvalidValue, hip.hipStreamWaitEvent, None, ev, 1)
    for fn in (hip.hipEventRecord, hip.hipEventQuery, hip.hipEventSynchronize, hip.hipEventDestroy):
        expect(E.hipErrorInvalidValue, fn, None)
    expect(E.hipErrorInvalidValue, hip.hipStreamWaitEvent, None, None)
    untimed = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    hip.hipEventRecord(ev)
    hip.hipEventRecord(untimed)
    hip.hipStreamSynchronize(None)  # the null stream is asynchronous to the host
    expect(E.hipErrorInvalidResourceHandle, hip.hipEventElapsedTime, ev, untimed)
    assert hip.hipEventElapsedTime(ev, ev) == 0.0
    hip.hipEventDestroy(untimed)
    hip.hipEventDestroy(ev)
    expect(E.hipErrorInvalidResourceHandle, hip.hipEventDestroy, ev)
    expect(E.hipErrorInvalidResourceHandle, hip.hipEventRecord, ev)


@row("hipEventCreateWithFlags", "hipIpcGetEventHandle", "hipIpcOpenEventHandle")
def _row_ipc_events(monkeypatch):
    """hip-tests' Unit_hipIpcEventHandle_ParameterValidation."""
    expect(E.hipErrorInvalidValue, hip.hipEventCreateWithFlags, 0xFF)
    expect(E.hipErrorInvalidValue, hip.hipEventCreateWithFlags, hip.hipEventInterprocess)
    expect(E.hipErrorInvalidValue, hip.hipIpcGetEventHandle, None)
    plain = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    expect(E.hipErrorInvalidConfiguration, hip.hipIpcGetEventHandle, plain)
    hip.hipEventDestroy(plain)
    expect(E.hipErrorInvalidValue, hip.hipIpcOpenEventHandle, bytes(64))
    ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
    expect(E.hipErrorInvalidContext, hip.hipIpcOpenEventHandle, hip.hipIpcGetEventHandle(ev))
    hip.hipEventDestroy(ev)


@row("hipDriverGetVersion", "hipRuntimeGetVersion")
def _row_versions(monkeypatch):
    assert hip.hipDriverGetVersion() == hip.hipRuntimeGetVersion() == hip.HIP_VERSION


@row(
    "hipGetDeviceProperties",
    "hipDeviceGetAttribute",
    "hipDeviceTotalMem",
    "hipDeviceComputeCapability",
    "hipDeviceGetName",
)
def _row_device_queries(monkeypatch):
    assert hip.hipGetDeviceProperties(0).unifiedAddressing == 1
    for fn in (
        hip.hipGetDeviceProperties,
        hip.hipDeviceTotalMem,
        hip.hipDeviceComputeCapability,
        hip.hipDeviceGetName,
    ):
        expect(E.hipErrorInvalidDevice, fn, -1)
        expect(E.hipErrorInvalidDevice, fn, 1)
    expect(E.hipErrorInvalidValue, hip.hipDeviceGetAttribute, -1, 0)
    expect(E.hipErrorInvalidDevice, hip.hipDeviceGetAttribute, A.hipDeviceAttributeWarpSize, 1)


@row(
    "hipDeviceCanAccessPeer",
    "hipDeviceEnablePeerAccess",
    "hipDeviceDisablePeerAccess",
    "hipDeviceReset",
    "hipMemcpyPeer",
    "hipMemcpyPeerAsync",
)
def _row_peers(monkeypatch):
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "2")
    try:
        assert hip.hipDeviceCanAccessPeer(0, 1) == 1
        expect(E.hipErrorInvalidDevice, hip.hipDeviceCanAccessPeer, 0, 2)
        expect(E.hipErrorInvalidDevice, hip.hipDeviceEnablePeerAccess, 2, 0)
        expect(E.hipErrorInvalidValue, hip.hipDeviceEnablePeerAccess, 0, -1)
        hip.hipDeviceEnablePeerAccess(1, 0)
        expect(E.hipErrorPeerAccessAlreadyEnabled, hip.hipDeviceEnablePeerAccess, 1, 0)
        hip.hipDeviceDisablePeerAccess(1)
        expect(E.hipErrorPeerAccessNotEnabled, hip.hipDeviceDisablePeerAccess, 1)
        expect(E.hipErrorInvalidDevice, hip.hipDeviceDisablePeerAccess, -1)
        ptr = hip.hipMalloc(16)
        hip.hipMemcpyPeer(ptr, 0, ptr + 8, 1, 8)
        hip.hipMemcpyPeerAsync(ptr, 0, ptr + 8, 1, 8)
        expect(E.hipErrorInvalidDevice, hip.hipMemcpyPeer, ptr, 2, ptr, 0, 8)
        expect(E.hipErrorInvalidDevice, hip.hipMemcpyPeerAsync, ptr, 0, ptr, 2, 8)
        hip.hipDeviceReset()
        expect(E.hipErrorInvalidValue, hip.hipFree, ptr)  # reset freed it
    finally:
        hip.device._peers.clear()


@row("hipMemGetInfo", "hipPointerGetAttributes")
def _row_memory_queries(monkeypatch):
    free, total = hip.hipMemGetInfo()
    assert 0 <= free <= total
    ptr = hip.hipMalloc(64)
    assert hip.hipPointerGetAttributes(ptr + 63).allocationBase == ptr
    expect(E.hipErrorInvalidValue, hip.hipPointerGetAttributes, ptr + 64)
    hip.hipFree(ptr)
    expect(E.hipErrorInvalidValue, hip.hipPointerGetAttributes, ptr)
    expect(E.hipErrorInvalidValue, hip.hipPointerGetAttributes, None)


@row("hipHostMalloc", "hipHostFree", "hipHostGetDevicePointer")
def _row_host_malloc(monkeypatch):
    buf = hip.hipHostMalloc(64)
    expect(E.hipErrorInvalidValue, hip.hipHostGetDevicePointer, buf, 1)
    assert hip.hipHostGetDevicePointer(buf, 0) == buf.ctypes.data
    expect(E.hipErrorInvalidValue, hip.hipHostMalloc, 64, 0x8)
    hip.hipHostFree(buf)
    expect(E.hipErrorInvalidValue, hip.hipHostFree, buf)
    expect(E.hipErrorInvalidValue, hip.hipHostGetDevicePointer, buf, 0)


@row("hipHostRegister", "hipHostUnregister")
def _row_host_register(monkeypatch):
    """hip-tests' hipHostRegister / hipHostUnregister negative cases."""
    data = bytearray(64)
    expect(E.hipErrorInvalidValue, hip.hipHostRegister, None, 64)
    expect(E.hipErrorInvalidValue, hip.hipHostRegister, data, 0)
    expect(E.hipErrorInvalidValue, hip.hipHostRegister, data, 64, 0x10)
    hip.hipHostRegister(data, 64, 0)
    expect(E.hipErrorHostMemoryAlreadyRegistered, hip.hipHostRegister, data, 64, 0)
    expect(
        E.hipErrorHostMemoryNotRegistered,
        hip.hipHostUnregister,
        np.frombuffer(data, np.uint8).ctypes.data + 4,
    )
    hip.hipHostUnregister(data)
    expect(E.hipErrorHostMemoryNotRegistered, hip.hipHostUnregister, data)
    expect(E.hipErrorInvalidValue, hip.hipHostUnregister, None)


@row("hipGetLastError", "hipPeekAtLastError")
def _row_last_error(monkeypatch):
    hip.hipGetLastError()
    code_of(hip.hipSetDevice, -1)
    assert hip.hipPeekAtLastError() == E.hipErrorInvalidDevice
    assert hip.hipGetLastError() == E.hipErrorInvalidDevice
    assert hip.hipGetLastError() == E.hipSuccess


def _pool_props(handles=1, device=0):
    return hip.hipMemPoolProps(
        allocType=hip.hipMemAllocationTypePinned,
        handleTypes=handles,
        location=hip.hipMemLocation(hip.hipMemLocationTypeDevice, device),
    )


@row("hipMemPoolCreate", "hipMemPoolDestroy")
def _row_mempool_create(monkeypatch):
    bad = _pool_props()
    bad.allocType = 0
    expect(E.hipErrorInvalidValue, hip.hipMemPoolCreate, bad)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolCreate, _pool_props(device=1))
    expect(E.hipErrorNotSupported, hip.hipMemPoolCreate, _pool_props(handles=2))
    pool = hip.hipMemPoolCreate(_pool_props())
    hip.hipMemPoolDestroy(pool)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolDestroy, pool)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolDestroy, hip.hipDeviceGetDefaultMemPool(0))


@row("hipDeviceGetDefaultMemPool", "hipDeviceGetMemPool", "hipDeviceSetMemPool")
def _row_device_mempool(monkeypatch):
    default = hip.hipDeviceGetDefaultMemPool(0)
    assert hip.hipDeviceGetMemPool(0) is default
    expect(E.hipErrorInvalidDevice, hip.hipDeviceGetDefaultMemPool, 1)
    expect(E.hipErrorInvalidDevice, hip.hipDeviceGetMemPool, 1)
    expect(E.hipErrorInvalidDevice, hip.hipDeviceSetMemPool, 1, default)
    pool = hip.hipMemPoolCreate(_pool_props(handles=0))
    hip.hipDeviceSetMemPool(0, pool)
    hip.hipMemPoolDestroy(pool)
    assert hip.hipDeviceGetMemPool(0) is default
    expect(E.hipErrorInvalidValue, hip.hipDeviceSetMemPool, 0, pool)


@row("hipMallocAsync", "hipMallocFromPoolAsync", "hipFreeAsync")
def _row_malloc_async(monkeypatch):
    pool = hip.hipMemPoolCreate(hip.hipMemPoolProps(1, 0, hip.hipMemLocation(1, 0), maxSize=4096))
    try:
        expect(E.hipErrorOutOfMemory, hip.hipMallocFromPoolAsync, 8192, pool, None)
        expect(E.hipErrorInvalidValue, hip.hipMallocAsync, -1)
        ptr = hip.hipMallocFromPoolAsync(64, pool, None)
        expect(E.hipErrorInvalidValue, hip.hipFreeAsync, ptr + 1, None)
        hip.hipFreeAsync(ptr, None)
        expect(E.hipErrorInvalidValue, hip.hipFreeAsync, ptr, None)  # twice
        hip.hipFreeAsync(0, None)
        hip.hipFreeAsync(hip.hipMallocAsync(64), None)
        hip.hipDeviceSynchronize(timeout=30)
    finally:
        hip.hipMemPoolDestroy(pool)


@row("hipMemPoolTrimTo", "hipMemPoolSetAttribute", "hipMemPoolGetAttribute")
def _row_mempool_attributes(monkeypatch):
    pool = hip.hipDeviceGetDefaultMemPool(0)
    threshold = hip.hipMemPoolAttrReleaseThreshold
    hip.hipMemPoolSetAttribute(pool, threshold, 1 << 20)
    assert hip.hipMemPoolGetAttribute(pool, threshold) == 1 << 20
    hip.hipMemPoolSetAttribute(pool, threshold, 0)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolSetAttribute, pool, 7, 0)  # read-only
    expect(E.hipErrorInvalidValue, hip.hipMemPoolSetAttribute, pool, threshold, 1 << 64)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolGetAttribute, pool, 99)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolTrimTo, None, 0)
    hip.hipMemPoolTrimTo(pool, 0)


@row("hipMemPoolSetAccess", "hipMemPoolGetAccess")
def _row_mempool_access(monkeypatch):
    pool = hip.hipDeviceGetDefaultMemPool(0)
    here = hip.hipMemLocation(hip.hipMemLocationTypeDevice, 0)
    assert hip.hipMemPoolGetAccess(pool, here) == hip.hipMemAccessFlagsProtReadWrite
    none = hip.hipMemAccessDesc(here, hip.hipMemAccessFlagsProtNone)
    expect(E.hipErrorInvalidDevice, hip.hipMemPoolSetAccess, pool, [none], 1)
    read = hip.hipMemAccessDesc(here, hip.hipMemAccessFlagsProtRead)
    expect(E.hipErrorNotSupported, hip.hipMemPoolSetAccess, pool, [read], 1)
    missing = hip.hipMemAccessDesc(hip.hipMemLocation(1, 1), hip.hipMemAccessFlagsProtReadWrite)
    expect(E.hipErrorInvalidDevice, hip.hipMemPoolSetAccess, pool, [missing], 1)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolSetAccess, None, [none], 1)
    expect(E.hipErrorInvalidValue, hip.hipMemPoolGetAccess, pool, hip.hipMemLocation(0, 0))
    expect(E.hipErrorInvalidValue, hip.hipMemPoolGetAccess, pool, hip.hipMemLocation(1, 1))


@row(
    "hipMemPoolExportToShareableHandle",
    "hipMemPoolImportFromShareableHandle",
    "hipMemPoolExportPointer",
    "hipMemPoolImportPointer",
)
def _row_mempool_ipc(monkeypatch):
    import os

    pool = hip.hipMemPoolCreate(_pool_props())
    ptr = hip.hipMallocFromPoolAsync(64, pool, None)
    try:
        default = hip.hipDeviceGetDefaultMemPool(0)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolExportToShareableHandle, default, 1, 0)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolExportToShareableHandle, pool, 0, 0)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolExportPointer, 0)
        data = hip.hipMemPoolExportPointer(ptr)
        fd = hip.hipMemPoolExportToShareableHandle(pool, 1, 0)
        try:
            expect(E.hipErrorInvalidValue, hip.hipMemPoolImportFromShareableHandle, None, 1, 0)
            expect(E.hipErrorInvalidValue, hip.hipMemPoolImportFromShareableHandle, fd, 0, 0)
            readonly = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                expect(E.hipErrorInvalidValue, hip.hipMemPoolImportFromShareableHandle, readonly)
            finally:
                os.close(readonly)
            imported = hip.hipMemPoolImportFromShareableHandle(fd, 1, 0)
        finally:
            os.close(fd)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolImportPointer, imported, None)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolImportPointer, None, data)
        expect(E.hipErrorInvalidValue, hip.hipMemPoolImportPointer, imported, bytes(64))
        hip.hipFree(hip.hipMemPoolImportPointer(imported, data))
        hip.hipMemPoolDestroy(imported)
    finally:
        hip.hipFree(ptr)
        hip.hipMemPoolDestroy(pool)


@pytest.mark.parametrize("call", sorted(ROWS))
def test_call_row(call, monkeypatch):
    """The README porting table's row for ``call``: its negative cases, with HIP's codes."""
    ROWS[call](monkeypatch)


def readme_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Every hip* call", 1)[1].split("\n## ", 1)[0]
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(hip\w+)` \|(.*)\|$", section, re.MULTILINE)
    }


def test_readme_table_lists_every_call_and_each_has_a_test():
    calls = {
        n
        for n in hip.__all__
        if n.startswith("hip") and isinstance(getattr(hip, n), types.FunctionType)
    }
    rows = readme_rows()
    assert set(rows) == calls, (sorted(calls - set(rows)), sorted(set(rows) - calls))
    assert set(ROWS) == calls, (sorted(calls - set(ROWS)), sorted(set(ROWS) - calls))
    for call, cells in rows.items():
        assert f"test_call_row[{call}]" in cells, call
        # Every code a row names exists, with the value it says.
        for name, value in re.findall(r"(hip(?:Error|Success)\w*) \((\d+)\)", cells):
            assert int(getattr(E, name)) == int(value), (call, name)
