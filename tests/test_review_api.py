"""Regression tests from the adversarial review of the API surface (issues 10-16 merged):
each test failed before its fix.
"""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
from _proc import Exporter

import hipipc as hip
from hipipc.registry import get_registry

E = hip.hipError_t


def code_of(fn, *args, **kwargs) -> E:
    with pytest.raises(hip.HipError) as info:
        fn(*args, **kwargs)
    return info.value.code


# -- hipHostRegister of device memory ---------------------------------------------------


def test_host_register_of_device_memory_is_refused_and_keeps_the_allocation():
    """A numpy view of hipMalloc memory is a buffer like any other; registering it used to
    put a host range at the allocation's base in the registry (keyed by base), shadowing the
    allocation, and unregistering it dropped the allocation's entry: hipFree then failed
    with a KeyError.  HIP refuses memory it knows already."""
    ptr = hip.hipMalloc(4096)
    try:
        view = hip.asarray(ptr, (4096,), np.uint8)
        assert code_of(hip.hipHostRegister, view, 16) == E.hipErrorHostMemoryAlreadyRegistered
        assert (
            code_of(hip.hipHostRegister, view[100:], 16) == E.hipErrorHostMemoryAlreadyRegistered
        )  # interior too
        assert hip.hipPointerGetAttributes(ptr).type == hip.hipMemoryTypeDevice
        assert code_of(hip.hipHostUnregister, view) == E.hipErrorHostMemoryNotRegistered
        del view
    finally:
        hip.hipFree(ptr)  # KeyError before the fix
    assert get_registry().region_at(ptr) is None


def test_host_register_of_imported_memory_is_refused():
    with Exporter([4096]) as exporter:
        ptr = hip.hipIpcOpenMemHandle(exporter.handles[0], hip.hipIpcMemLazyEnablePeerAccess)
        try:
            view = hip.asarray(ptr, (4096,), np.uint8)
            assert code_of(hip.hipHostRegister, view, 4096) == E.hipErrorHostMemoryAlreadyRegistered
            del view
        finally:
            hip.hipIpcCloseMemHandle(ptr)


# -- DeviceBuffer across hipDeviceReset --------------------------------------------------


def _reuse_address(old: int, size: int) -> int | None:
    """A new allocation at ``old`` (the kernel hands back the hole just unmapped), or None."""
    held = []
    try:
        for _ in range(8):
            p = hip.hipMalloc(size)
            if p == old:
                return p
            held.append(p)
        return None
    finally:
        for p in held:
            hip.hipFree(p)


def test_a_buffer_released_by_device_reset_never_frees_the_next_allocation_there():
    """hipDeviceReset frees every allocation, a DeviceBuffer's too.  Dropping that buffer
    afterwards used to hipFree its old pointer, which by then could be a new allocation of
    someone else at the same address: silently freed under its owner."""
    buf = hip.DeviceBuffer.allocate(4096)
    old = buf.ptr
    hip.hipDeviceReset()
    fresh = _reuse_address(old, 4096)
    if fresh is None:
        hip.hipFree(hip.hipMalloc(1))
        pytest.skip("the kernel did not reuse the address; nothing to check")
    try:
        assert buf.closed is False  # it does not know yet: every use checks
        for use in (buf.asarray, lambda b=buf: b[0:8], lambda b=buf: pickle.dumps(b), buf.close):
            assert code_of(use) == E.hipErrorInvalidValue
        del buf
        gc.collect()
        assert hip.hipMemGetAddressRange(fresh) == (fresh, 4096)  # still allocated
    finally:
        hip.hipFree(fresh)


def test_a_buffer_freed_behind_its_back_does_not_view_the_new_allocation():
    buf = hip.DeviceBuffer.allocate(4096)
    view = buf[16:32]
    old = buf.ptr
    hip.hipFree(old)  # behind its back
    fresh = _reuse_address(old, 4096)
    if fresh is None:
        with pytest.raises(hip.HipError):
            buf.close()
        pytest.skip("the kernel did not reuse the address; nothing to check")
    try:
        hip.hipMemset(fresh, 7, 4096)
        assert code_of(view.asarray) == E.hipErrorInvalidValue  # not the new bytes
        assert code_of(buf.close) == E.hipErrorInvalidValue
        del view, buf
        gc.collect()
        assert hip.asarray(fresh, (4096,), np.uint8).min() == 7
    finally:
        hip.hipFree(fresh)


def test_unpickling_a_ticket_after_reset_does_not_alias_the_dead_owner():
    buf = hip.DeviceBuffer.allocate(256)
    data = pickle.dumps(buf)
    buf.asarray()[:] = 9
    hip.hipDeviceReset()
    # Before: an alias of the dead owner, pointing at unmapped (or reused) memory.  Now the
    # ticket opens the memory it keeps alive, as in any receiver (send-and-drop).
    back = pickle.loads(data)
    try:
        assert not back.is_owner and back.ptr != 0
        assert back.asarray().min() == 9
    finally:
        back.close()
    with pytest.raises(hip.HipError):
        buf.close()


# -- SharedArray: as_strided views ---------------------------------------------------------


def test_as_strided_views_are_checked_against_their_allocation():
    """as_strided/sliding_window_view base their result on a DummyArray, which hid the
    mapping: such a SharedArray pickled as a numpy copy, read past the mapping (SIGSEGV)
    when its strides reached outside it.  Now it is shared when it fits and refused when
    it does not."""
    from numpy.lib.stride_tricks import as_strided, sliding_window_view

    buf = hip.DeviceBuffer.allocate(4096)
    try:
        a = buf.asarray(np.int32)
        a[:] = np.arange(1024)
        windows = sliding_window_view(a, 3, subok=True)
        assert hip.is_shared(windows)
        back = pickle.loads(pickle.dumps(windows))
        assert (back == windows).all()
        a[0] = -5
        assert back[0, 0] == -5  # the same bytes, not a copy
        del back
        for bad in (
            as_strided(a, shape=(2000,), strides=(4,), subok=True),
            as_strided(a[1000:], shape=(10,), strides=(-4000,), subok=True),
        ):
            assert not hip.is_shared(bad)
            assert code_of(pickle.dumps, bad) == E.hipErrorInvalidValue
        del a, windows, bad
    finally:
        buf.close()


def test_a_forged_array_pickle_reaching_past_the_allocation_is_refused():
    """The receiver rebuilds with numpy's own bounds check against the whole allocation:
    a pickle whose offset, shape or strides reach outside it opens nothing out of bounds."""
    from hipipc.arrays import _rebuild_array, _shared_spec

    buf = hip.DeviceBuffer.allocate(4096)
    raw, ticket, offset, shape, strides, dtype = _shared_spec(buf.asarray(np.int32))
    try:
        for o, sh, st in (
            (4080, (10,), (4,)),
            (0, (10,), (-4,)),
            (0, (2000,), (4,)),
            (4092, (2,), (8,)),
            (-4, (1,), (4,)),
        ):
            with pytest.raises(hip.HipError) as info:
                _rebuild_array(raw, None, o, sh, st, dtype)
            assert info.value.code == E.hipErrorInvalidValue
    finally:
        get_registry().backend.store.consume_ticket(hip.IpcMemHandle(raw), ticket)
        buf.close()


# -- descriptor limit: interprocess events ----------------------------------------------------

EVENTS_AT_THE_FD_LIMIT = """
import json, os, resource
import hipipc as hip
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # hard = soft: nothing to raise
flags = hip.hipEventInterprocess | hip.hipEventDisableTiming
hip.hipEventDestroy(hip.hipEventCreateWithFlags(flags))  # the store's cached descriptor
base = len(os.listdir("/proc/self/fd"))
events, error = [], None
try:
    for _ in range(200):
        events.append(hip.hipEventCreateWithFlags(flags))
except hip.HipError as exc:
    error = exc
for ev in events:
    hip.hipEventDestroy(ev)
print(json.dumps({"made": len(events), "code": int(error.code) if error else 0,
                  "detail": error.detail if error else "",
                  "leaked_fds": len(os.listdir("/proc/self/fd")) - base}))
"""


def test_interprocess_events_at_the_descriptor_limit_say_what_holds_descriptors():
    """Each interprocess event holds a descriptor (two until exported): running out of them
    is hipErrorOutOfMemory naming the limit, and the message names events, not only
    "unexported allocations" (which this process has none of); a failed creation leaks no
    descriptor."""
    from _proc import run_json

    out = run_json(EVENTS_AT_THE_FD_LIMIT)
    assert 10 < out["made"] < 64
    assert out["code"] == E.hipErrorOutOfMemory
    assert "RLIMIT_NOFILE" in out["detail"] and "event" in out["detail"]
    assert out["leaked_fds"] == 0


# -- pinned memory: hipHostFree unpins at once ------------------------------------------------


def _pin_free_pin_again() -> list:
    import os
    import resource

    from hipipc.store import PAGE_SIZE

    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # no CAP_IPC_LOCK: RLIMIT_MEMLOCK counts
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (4 * PAGE_SIZE, 4 * PAGE_SIZE))
    os.environ["HIPIPC_PIN"] = "require"
    kept = [hip.hipHostMalloc(PAGE_SIZE) for _ in range(4)]  # the whole allowance
    for buf in kept:
        hip.hipHostFree(buf)  # the arrays stay referenced (a view outliving its free)
    out = []
    for _ in range(4):
        try:
            again = hip.hipHostMalloc(PAGE_SIZE)
        except hip.HipError as exc:
            out.append(exc.code.name)
            continue
        out.append("ok")
        hip.hipHostFree(again)
    kept[0][:] = 1  # still mapped: no use-after-unmap
    return out


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to drop to another uid")
def test_host_free_unpins_even_while_a_view_lives():
    """hipHostFree used to leave the pages locked until the last numpy view of them went,
    so freed-but-referenced buffers used up RLIMIT_MEMLOCK and HIPIPC_PIN=require failed."""
    from _proc import in_fork

    assert in_fork(_pin_free_pin_again) == ["ok"] * 4


# -- integer arguments: numpy integers everywhere, as the runtime's rule says ---------------


def test_zero_flags_take_any_integer_type_and_refuse_bool():
    """hipInit, hipDeviceEnablePeerAccess and hipHostGetDevicePointer checked
    ``type(flags) is int``: a numpy 0 (ported code reading flags from an array) was
    hipErrorInvalidValue, unlike every other integer argument."""
    hip.hipInit(np.int32(0))
    pinned = hip.hipHostMalloc(16)
    try:
        assert hip.hipHostGetDevicePointer(pinned, np.uint8(0)) == pinned.ctypes.data
        assert code_of(hip.hipHostGetDevicePointer, pinned, False) == E.hipErrorInvalidValue
        assert code_of(hip.hipHostGetDevicePointer, pinned, np.int32(1)) == E.hipErrorInvalidValue
    finally:
        hip.hipHostFree(pinned)
    assert code_of(hip.hipInit, True) == E.hipErrorInvalidValue
    assert code_of(hip.hipInit, 0.0) == E.hipErrorInvalidValue
    assert code_of(hip.hipDeviceEnablePeerAccess, 0, np.int64(0)) == E.hipErrorInvalidDevice
    assert code_of(hip.hipDeviceEnablePeerAccess, 0, np.int64(3)) != E.hipSuccess
