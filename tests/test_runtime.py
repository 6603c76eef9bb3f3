"""The hip* table: one test per memory row of BRIEF section 4, devices, copies, views.

Every IPC rule needs two processes (CUDA and HIP refuse an open in the exporting process), so
the importer or the exporter here is always a spawned interpreter, never only a fork.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import posix_ipc
import pytest
from _proc import Exporter, child_env, pattern, run_json, run_python, store_names

import hipipc as hip

E = hip.hipError_t
K = hip.hipMemcpyKind


def code(excinfo) -> hip.hipError_t:
    return excinfo.value.code


# The rules of this file that are the same on both transports run on both (conftest's
# ``transport``); what differs (no file, exit and kill -9 revoke at once) is tested in
# test_fd_transport.py.
BOTH_TRANSPORTS = pytest.mark.usefixtures("transport")


@pytest.fixture
def alloc():
    """Allocate-and-free helper: ``alloc(n)`` returns a pointer freed after the test."""
    ptrs: list[int] = []

    def make(nbytes: int) -> int:
        ptrs.append(hip.hipMalloc(nbytes))
        return ptrs[-1]

    yield make
    for ptr in ptrs:
        hip.hipFree(ptr)


def read(ptr: int, nbytes: int) -> bytes:
    out = bytearray(nbytes)
    hip.hipMemcpy(out, ptr, nbytes, K.hipMemcpyDeviceToHost)
    return bytes(out)


# -- BRIEF section 4, one test per memory row ------------------------------------------


@BOTH_TRANSPORTS
def test_interior_pointer_exports_the_base_handle_and_address_range_gives_the_offset(alloc):
    base = alloc(10000)
    hip.hipMemset(base, 0, 10000)
    # The first export goes through an interior pointer: it must still be the base's handle.
    inner = hip.hipIpcGetMemHandle(base + 1234)
    assert bytes(inner) == bytes(hip.hipIpcGetMemHandle(base))
    assert bytes(hip.hipIpcGetMemHandle(base + 9999)) == bytes(inner)
    assert hip.hipMemGetAddressRange(base + 1234) == (base, 10000)
    assert hip.hipMemGetAddressRange(base + 9999) == (base, 10000)
    with pytest.raises(hip.HipError) as exc:
        hip.hipMemGetAddressRange(base + 10000)  # one past the end is not inside
    assert code(exc) == E.hipErrorNotFound  # HIP's code (hip-tests: hipMemGetAddressRange)
    # The importer applies the offset itself, as a CUDA program does.
    got = run_json(
        """
        import json, sys
        import hipipc as hip
        ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
        offset = int(sys.argv[2])
        base, size = hip.hipMemGetAddressRange(ptr + offset)
        hip.hipMemcpy(ptr + offset, b"interior", 8, hip.hipMemcpyHostToDevice)
        hip.hipIpcCloseMemHandle(ptr)
        print(json.dumps([base == ptr, size]))
    """,
        bytes(inner).hex(),
        "1234",
    )
    assert got == [True, 10000]
    assert read(base + 1234, 8) == b"interior" and read(base + 1226, 8) == bytes(8)


@BOTH_TRANSPORTS
def test_exporting_twice_gives_the_same_bytes(alloc):
    ptr = alloc(4096)
    first = bytes(hip.hipIpcGetMemHandle(ptr))
    opened = run_json(
        """
        import json, sys
        import hipipc as hip
        ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
        hip.hipIpcCloseMemHandle(ptr)
        print(json.dumps(True))
    """,
        first.hex(),
    )
    assert opened
    assert bytes(hip.hipIpcGetMemHandle(ptr)) == first  # also after an import happened
    assert bytes(hip.hipIpcGetMemHandle(ptr, share="all")) == first  # share: first export


@BOTH_TRANSPORTS
def test_free_then_new_allocation_at_the_same_address_gets_a_new_handle():
    old_ptr = hip.hipMalloc(8192)
    old = hip.hipIpcGetMemHandle(old_ptr)
    hip.hipFree(old_ptr)
    new_ptr = hip.hipMalloc(8192)  # mmap hands back the hole just freed
    try:
        assert new_ptr == old_ptr, "the kernel did not reuse the address; the row is untested"
        new = hip.hipIpcGetMemHandle(new_ptr)
        assert new != old and bytes(new)[8:24] != bytes(old)[8:24]
        hip.hipMemset(new_ptr, 0x5A, 8192)
        got = run_json(
            """
            import json, sys
            import hipipc as hip
            out = []
            for raw in sys.argv[1:]:
                try:
                    ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(raw))
                except hip.HipError as exc:
                    out.append(exc.code.name)
                else:
                    out.append(bytes(hip.asarray(ptr, 4)).hex())
                    hip.hipIpcCloseMemHandle(ptr)
            print(json.dumps(out))
        """,
            bytes(old).hex(),
            bytes(new).hex(),
        )
        assert got == ["hipErrorInvalidHandle", "5a5a5a5a"]  # 400: InvalidResourceHandle
    finally:
        hip.hipFree(new_ptr)


@BOTH_TRANSPORTS
def test_open_in_the_exporting_process_is_invalid_context(alloc):
    ptr = alloc(4096)
    handle = hip.hipIpcGetMemHandle(ptr + 100)
    for form in (handle, bytes(handle), bytearray(bytes(handle)), memoryview(bytes(handle))):
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenMemHandle(form)
        assert code(exc) == E.hipErrorInvalidContext
        assert "use the pointer itself" in str(exc.value)


IMPORT_RULES = """
import json, sys
import hipipc as hip
E = hip.hipError_t
raw = bytes.fromhex(sys.argv[1])
out = {}

def code_of(fn, *args):
    try:
        fn(*args)
    except hip.HipError as exc:
        return exc.code.name
    return "ok"

# Flags other than hipIpcMemLazyEnablePeerAccess.
out["flags"] = [code_of(hip.hipIpcOpenMemHandle, raw, f) for f in (0, 2, 3, -1, 1 << 31)]
# Open twice: same pointer, one close each.
p1 = hip.hipIpcOpenMemHandle(raw)
p2 = hip.hipIpcOpenMemHandle(bytearray(raw), hip.hipIpcMemLazyEnablePeerAccess)
out["same_pointer"] = p1 == p2
size = hip.hipMemGetAddressRange(p1)[1]
hip.hipIpcCloseMemHandle(p1)
out["after_one_close"] = [hip.hipMemGetAddressRange(p1) == (p1, size),
                          bytes(hip.asarray(p1, 3)).hex()]
hip.hipMemset(p1, 0x11, 1)
hip.hipIpcCloseMemHandle(p2)
out["third_close"] = code_of(hip.hipIpcCloseMemHandle, p1)
out["range_after_close"] = code_of(hip.hipMemGetAddressRange, p1)
# Close of pointers that were not imported.
own = hip.hipMalloc(64)
p3 = hip.hipIpcOpenMemHandle(raw)
out["bad_close"] = [code_of(hip.hipIpcCloseMemHandle, x)
                    for x in (own, p3 + 1, 0, 12345, None, "p", 1.5)]
out["free_import"] = code_of(hip.hipFree, p3)
out["export_import"] = code_of(hip.hipIpcGetMemHandle, p3)
hip.hipIpcCloseMemHandle(p3)
hip.hipFree(own)
out["reopen_sees_write"] = bytes(hip.asarray(p := hip.hipIpcOpenMemHandle(raw), 1)).hex()
hip.hipIpcCloseMemHandle(p)
print(json.dumps(out))
"""


@BOTH_TRANSPORTS
def test_open_twice_flags_and_closes_follow_hips_rules():
    with Exporter([4096]) as exporter:
        got = run_json(IMPORT_RULES, exporter.handles[0].hex())
        invalid = "hipErrorInvalidValue"
        assert got["flags"] == [invalid] * 5
        assert got["same_pointer"] is True
        assert got["after_one_close"] == [True, pattern(0, 3).hex()]  # still mapped
        assert got["third_close"] == invalid
        assert got["range_after_close"] == "hipErrorNotFound"
        assert got["bad_close"] == [invalid] * 7
        assert got["free_import"] == invalid and got["export_import"] == invalid
        assert got["reopen_sees_write"] == "11"
        expected = bytearray(pattern(0, 4096))
        expected[0] = 0x11
        assert exporter.command("sum 0") == hashlib.sha256(expected).hexdigest()


OPEN_ONE = """
import sys
import hipipc as hip
try:
    ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
except hip.HipError as exc:
    print(exc.code.name, exc.detail)
else:
    print("opened")
"""


@BOTH_TRANSPORTS
def test_exporter_frees_while_imported_revokes_new_opens_but_keeps_the_mapping():
    with Exporter([8192]) as exporter:
        raw = exporter.handles[0]
        ptr = hip.hipIpcOpenMemHandle(raw)
        try:
            view = hip.asarray(ptr, 8192)
            assert exporter.command("free 0") == "freed"
            # A fresh process cannot open it any more, and is told why.
            out = run_python(OPEN_ONE, raw.hex())
            assert out.returncode == 0, out.stderr
            text = out.stdout.decode()
            assert text.startswith("hipErrorInvalidHandle "), text
            assert "freed by its exporter" in text
            # The mapping stays valid here: readable, writable, through copies and views.
            assert bytes(view) == pattern(0, 8192)
            hip.hipMemset(ptr + 100, 0xEE, 50)
            assert read(ptr + 100, 50) == b"\xee" * 50 and view[149] == 0xEE
            view[8191] = 7
            assert read(ptr + 8191, 1) == b"\x07"
            del view
        finally:
            hip.hipIpcCloseMemHandle(ptr)
        # Once closed, this process cannot open it again either.
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenMemHandle(raw)
        assert code(exc) == E.hipErrorInvalidResourceHandle


def test_malloc_zero_is_null_and_free_null_does_nothing():
    before = store_names()
    assert hip.hipMalloc(0) == 0
    hip.hipFree(0)
    hip.hipFree(np.int64(0))
    assert store_names() == before


@pytest.mark.parametrize("bad", [-1, 1.5, "8", None, 2**64 + 5])
def test_malloc_of_a_bad_size_is_invalid_value(bad):
    with pytest.raises(hip.HipError) as exc:
        hip.hipMalloc(bad)
    assert code(exc) in (E.hipErrorInvalidValue, E.hipErrorOutOfMemory)
    if bad != 2**64 + 5:
        assert code(exc) == E.hipErrorInvalidValue


@BOTH_TRANSPORTS
@pytest.mark.parametrize("nbytes", [1 << 62, 1 << 63, 2**64 - 1])
def test_malloc_larger_than_memory_is_out_of_memory(nbytes):
    with pytest.raises(hip.HipError) as exc:
        hip.hipMalloc(nbytes)
    assert code(exc) == E.hipErrorOutOfMemory


def test_free_of_interior_unknown_or_freed_pointers_is_invalid_value():
    # 4000 bytes: ptr + 4000 lies in the page's tail, never in a neighbouring allocation.
    ptr = hip.hipMalloc(4000)
    for bad in (ptr + 1, ptr + 4000, 12345, None, "x", 1.5):
        with pytest.raises(hip.HipError) as exc:
            hip.hipFree(bad)
        assert code(exc) == E.hipErrorInvalidValue
    hip.hipFree(ptr)
    with pytest.raises(hip.HipError) as exc:
        hip.hipFree(ptr)
    assert code(exc) == E.hipErrorInvalidValue


# -- devices ---------------------------------------------------------------------------


def test_one_host_device_by_default(monkeypatch):
    monkeypatch.delenv("HIPIPC_HOST_DEVICES", raising=False)
    assert hip.hipGetDeviceCount() == 1
    assert hip.hipGetDevice() == 0
    hip.hipSetDevice(0)
    assert hip.hipDeviceSynchronize() is None
    for bad in (1, -1, "0", 0.0, None):
        with pytest.raises(hip.HipError) as exc:
            hip.hipSetDevice(bad)
        assert code(exc) == E.hipErrorInvalidDevice
    assert hip.hipGetDevice() == 0


def test_host_devices_env_sets_the_count_and_the_device_is_per_thread(monkeypatch):
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", "3")
    assert hip.hipGetDeviceCount() == 3
    try:
        hip.hipSetDevice(2)
        assert hip.hipGetDevice() == 2
        with pytest.raises(hip.HipError) as exc:
            hip.hipSetDevice(3)
        assert code(exc) == E.hipErrorInvalidDevice and hip.hipGetDevice() == 2
        other: list[int] = []
        t = threading.Thread(target=lambda: other.append(hip.hipGetDevice()))
        t.start()
        t.join(10)
        assert other == [0]  # CUDA/HIP: the current device is per thread
        ptr = hip.hipMalloc(64)
        try:
            assert hip.hipIpcGetMemHandle(ptr).device == 2
        finally:
            hip.hipFree(ptr)
        hip.hipDeviceSynchronize()
    finally:
        hip.hipSetDevice(0)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_no_usable_host_device_is_no_device(monkeypatch, value):
    monkeypatch.setenv("HIPIPC_HOST_DEVICES", value)
    with pytest.raises(hip.HipError) as exc:
        hip.hipGetDeviceCount()
    assert code(exc) == E.hipErrorNoDevice and "HIPIPC_HOST_DEVICES" in str(exc.value)


def test_host_devices_env_reaches_a_spawned_interpreter():
    got = run_json(
        """
        import json
        import hipipc as hip
        hip.hipSetDevice(1)
        ptr = hip.hipMalloc(16)
        out = [hip.hipGetDeviceCount(), hip.hipGetDevice(), hip.hipIpcGetMemHandle(ptr).device]
        hip.hipFree(ptr)
        print(json.dumps(out))
    """,
        env=child_env(HIPIPC_HOST_DEVICES="2"),
    )
    assert got == [2, 1, 1]


# -- hipMemcpy -------------------------------------------------------------------------


@BOTH_TRANSPORTS
def test_memcpy_every_kind_moves_the_bytes(alloc):
    a, b = alloc(256), alloc(256)
    src = bytes(range(256))
    hip.hipMemcpy(a, src, 256, K.hipMemcpyHostToDevice)
    assert read(a, 256) == src
    hip.hipMemcpy(b, a, 256, K.hipMemcpyDeviceToDevice)
    out = np.zeros(256, dtype=np.uint8)
    hip.hipMemcpy(out, b, 256, K.hipMemcpyDeviceToHost)
    assert out.tobytes() == src
    host = bytearray(256)
    hip.hipMemcpy(host, out, 256, K.hipMemcpyHostToHost)
    assert bytes(host) == src
    # hipMemcpyKind values are HIP's, and plain ints work as the kind.
    assert [int(k) for k in K] == [0, 1, 2, 3, 4]
    hip.hipMemcpy(host, memoryview(b"\x01" * 256), 256, 0)
    assert bytes(host) == b"\x01" * 256


@pytest.mark.parametrize(
    "dst_dev,src_dev", [(True, True), (True, False), (False, True), (False, False)]
)
def test_memcpy_default_infers_each_side_from_its_type(alloc, dst_dev, src_dev):
    payload = os.urandom(100)
    if src_dev:
        src = alloc(200) + 50  # interior pointer
        hip.hipMemcpy(src, payload, 100, K.hipMemcpyHostToDevice)
    else:
        src = np.frombuffer(payload, dtype=np.uint8)
    dst = alloc(100) if dst_dev else bytearray(100)
    hip.hipMemcpy(dst, src, 100, K.hipMemcpyDefault)
    hip.hipMemcpy(dst, src, 100)  # Default is the default
    assert (read(dst, 100) if dst_dev else bytes(dst)) == payload


def test_memcpy_between_interior_pointers_of_two_allocations(alloc):
    a, b = alloc(1000), alloc(3000)
    hip.hipMemset(a, 0, 1000)
    hip.hipMemcpy(b + 2900, bytes(range(100)), 100, K.hipMemcpyHostToDevice)
    hip.hipMemcpy(a + 900, b + 2900, 100, K.hipMemcpyDeviceToDevice)
    assert read(a + 900, 100) == bytes(range(100)) and read(a, 900) == bytes(900)
    hip.hipMemcpy(a, a + 900, 100, K.hipMemcpyDeviceToDevice)
    assert read(a, 100) == bytes(range(100))


def test_memcpy_out_of_bounds_is_invalid_value_and_writes_nothing(alloc):
    a, b = alloc(100), alloc(100)
    hip.hipMemset(a, 0xAA, 100)
    hip.hipMemset(b, 0xBB, 100)
    cases = [
        (a + 50, bytes(51), 51, K.hipMemcpyHostToDevice),  # past the end of dst
        (bytearray(100), a + 1, 100, K.hipMemcpyDeviceToHost),  # past the end of src
        (a, b, 101, K.hipMemcpyDeviceToDevice),
        (a + 100, b, 1, K.hipMemcpyDeviceToDevice),  # one past the end
        (a, b + 4000, 1, K.hipMemcpyDeviceToDevice),  # in the page's tail
        (a, bytes(10), 11, K.hipMemcpyHostToDevice),  # host source too small
        (bytearray(10), a, 11, K.hipMemcpyDeviceToHost),  # host dest too small
        (a, b, -1, K.hipMemcpyDeviceToDevice),
        (a, b, 1.0, K.hipMemcpyDeviceToDevice),
        (12345, b, 1, K.hipMemcpyDeviceToDevice),  # not an allocation
    ]
    for dst, src, n, kind in cases:
        with pytest.raises(hip.HipError) as exc:
            hip.hipMemcpy(dst, src, n, kind)
        assert code(exc) == E.hipErrorInvalidValue, (n, kind)
    assert read(a, 100) == b"\xaa" * 100 and read(b, 100) == b"\xbb" * 100


def test_memcpy_sides_of_the_wrong_type_are_invalid_value(alloc):
    a = alloc(64)
    host = bytearray(64)
    cases = [
        (host, b"x" * 64, K.hipMemcpyHostToDevice),  # device dst given as a buffer
        (a, a, K.hipMemcpyHostToDevice),  # host src given as a pointer
        (host, host, K.hipMemcpyDeviceToHost),  # device src given as a buffer
        (a, a, K.hipMemcpyDeviceToHost),  # host dst given as a pointer
        (a, host, K.hipMemcpyDeviceToDevice),
        (host, a, K.hipMemcpyHostToHost),
        (True, a, K.hipMemcpyDeviceToDevice),  # a bool is not a pointer
        (a, None, K.hipMemcpyDefault),
        (a, "text", K.hipMemcpyDefault),
        (np.zeros(128, np.uint8)[::2], a, K.hipMemcpyDefault),  # not contiguous
    ]
    for dst, src, kind in cases:
        with pytest.raises(hip.HipError) as exc:
            hip.hipMemcpy(dst, src, 64, kind)
        assert code(exc) == E.hipErrorInvalidValue, kind


def test_memcpy_into_read_only_memory_is_invalid_value(alloc):
    a = alloc(16)
    frozen = np.zeros(16, dtype=np.uint8)
    frozen.flags.writeable = False
    for dst in (bytes(16), memoryview(bytes(16)), frozen):
        for src, kind in (
            (a, K.hipMemcpyDeviceToHost),
            (bytearray(16), K.hipMemcpyHostToHost),
            (a, K.hipMemcpyDefault),
        ):
            with pytest.raises(hip.HipError) as exc:
                hip.hipMemcpy(dst, src, 16, kind)
            assert code(exc) == E.hipErrorInvalidValue
            assert "read-only" in str(exc.value)
    assert not frozen.any()


@pytest.mark.parametrize("kind", [5, -1, 99, "1", None, 2.5])
def test_memcpy_with_an_unknown_kind_is_invalid_memcpy_direction(alloc, kind):
    a, b = alloc(8), alloc(8)
    with pytest.raises(hip.HipError) as exc:
        hip.hipMemcpy(a, b, 8, kind)
    assert code(exc) == E.hipErrorInvalidMemcpyDirection


def test_memcpy_of_zero_bytes_does_nothing(alloc):
    a = alloc(8)
    hip.hipMemset(a, 3, 8)
    hip.hipMemcpy(a, b"", 0, K.hipMemcpyHostToDevice)
    hip.hipMemcpy(bytearray(), a, 0)
    assert read(a, 8) == b"\x03" * 8


# -- hipMemset -------------------------------------------------------------------------


def test_memset_is_bounds_checked_and_masks_the_value(alloc):
    a = alloc(100)
    hip.hipMemset(a, 0x1FF, 100)  # HIP takes the low byte
    assert read(a, 100) == b"\xff" * 100
    hip.hipMemset(a + 90, 1, 10)
    assert read(a + 88, 12) == b"\xff\xff" + b"\x01" * 10
    # Past the end lands in the page's unused tail, never in a neighbouring allocation.
    for ptr, n in ((a + 91, 10), (a, 101), (a + 100, 1), (a + 4095, 1), (a, -1), (12345, 1)):
        with pytest.raises(hip.HipError) as exc:
            hip.hipMemset(ptr, 0, n)
        assert code(exc) == E.hipErrorInvalidValue
    for ptr, value in ((None, 0), ("a", 0), (a, "x"), (a, None)):
        with pytest.raises(hip.HipError) as exc:
            hip.hipMemset(ptr, value, 1)
        assert code(exc) == E.hipErrorInvalidValue
    assert read(a + 88, 12) == b"\xff\xff" + b"\x01" * 10


# -- asarray ---------------------------------------------------------------------------


def test_asarray_is_a_zero_copy_bounds_checked_view(alloc):
    a = alloc(64)
    view = hip.asarray(a + 8, (2, 3), np.int64)
    assert view.__array_interface__["data"][0] == a + 8 and view.shape == (2, 3)
    view[:] = 5
    assert np.frombuffer(read(a + 8, 48), np.int64).tolist() == [5] * 6
    for args in (
        (a, 65),
        (a + 8, (8,), np.int64),
        (a, (-1,)),
        (a, 8, "no-such-dtype"),
        (None, 8),
        (12345, 8),
    ):
        with pytest.raises(hip.HipError) as exc:
            hip.asarray(*args)
        assert code(exc) == E.hipErrorInvalidValue


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((2**32, 2**32), np.uint8),
        ((2**62 + 1, 4), np.uint8),
        (3.0, np.uint8),
        ((4,), object),
        ((4,), "V0"),  # no size: numpy's ValueError escaped before
        ((2,), "(2,)i4"),  # a subarray dtype: likewise
    ],
)
def test_asarray_of_an_impossible_shape_or_dtype_is_invalid_value(alloc, shape, dtype):
    # Huge shapes must not wrap around in a fixed-width product; numpy's own errors for float
    # shapes and object dtypes must not escape as anything but HipError.
    a = alloc(64)
    with pytest.raises(hip.HipError) as exc:
        hip.asarray(a, shape, dtype)
    assert code(exc) == E.hipErrorInvalidValue


VIEWS_OUTLIVE = """
import json, sys
import numpy as np
import hipipc as hip

def mapped(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False

out = {}
# Own memory: the view outlives hipFree.
ptr = hip.hipMalloc(1 << 20)
hip.hipMemset(ptr, 9, 1 << 20)
whole = hip.asarray(ptr, 1 << 18, np.int32)
part = hip.asarray(ptr + 4096, 16)[4:8]
hip.hipFree(ptr)
out["own_read"] = int(whole[-1]) == 0x09090909 and part.tolist() == [9] * 4
whole[:] = 1
part[:] = 2
out["own_write"] = int(whole.sum()) == (1 << 18) - 1 + 0x02020202  # one int is 2222
del whole
out["mapped_while_part_lives"] = mapped(ptr)
del part
out["unmapped_after_last_view"] = not mapped(ptr)
# Imported memory: the view outlives hipIpcCloseMemHandle and still shares the pages.
imp = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))
view = hip.asarray(imp, 4096)
hip.hipIpcCloseMemHandle(imp)
out["import_read"] = int(view[0]) == 0x42
view[:16] = 0x43
del view
out["import_unmapped"] = not mapped(imp)
print(json.dumps(out))
"""


@BOTH_TRANSPORTS
def test_views_keep_memory_alive_after_free_and_close(alloc):
    # The dangerous part runs in a subprocess: a use-after-unmap would be SIGSEGV there,
    # a failed test here, not a dead pytest.
    ptr = alloc(4096)
    hip.hipMemset(ptr, 0x42, 4096)
    proc = run_python(VIEWS_OUTLIVE, bytes(hip.hipIpcGetMemHandle(ptr)).hex())
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode())
    got = json.loads(proc.stdout.decode().splitlines()[-1])
    assert got == {
        "own_read": True,
        "own_write": True,
        "mapped_while_part_lives": True,
        "unmapped_after_last_view": True,
        "import_read": True,
        "import_unmapped": True,
    }
    assert read(ptr, 17) == b"\x43" * 16 + b"\x42"  # the importer's late write landed here


# -- handles through channels into spawned interpreters --------------------------------

PIPE_CONSUMER = """
import os, sys
import numpy as np
import hipipc as hip
rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
for _ in range(2):
    raw = b""
    while len(raw) < 64:
        chunk = os.read(rfd, 64 - len(raw))
        if not chunk:
            sys.exit("pipe closed early")
        raw += chunk
    ptr = hip.hipIpcOpenMemHandle(raw)
    data = hip.asarray(ptr, 1024, np.int32)
    ok = bool(np.all(data == np.arange(1024)))
    data *= 2
    del data
    hip.hipIpcCloseMemHandle(ptr)
    os.write(wfd, b"k" if ok else b"x")
"""


@BOTH_TRANSPORTS
def test_handles_through_a_pipe_to_a_spawned_interpreter(alloc):
    ptrs = [alloc(4096), alloc(4096)]
    for ptr in ptrs:
        hip.hipMemcpy(ptr, np.arange(1024, dtype=np.int32), 4096)
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPE_CONSUMER, str(from_parent), str(to_parent)],
        pass_fds=(from_parent, to_parent),
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    os.close(from_parent)
    os.close(to_parent)
    try:
        replies = b""
        with os.fdopen(from_child, "rb", buffering=0) as answers:
            for ptr in ptrs:
                os.write(to_child, bytes(hip.hipIpcGetMemHandle(ptr)))
                replies += readline_byte(answers)
        assert replies == b"kk"
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        os.close(to_child)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    for ptr in ptrs:
        assert np.all(hip.asarray(ptr, 1024, np.int32) == 2 * np.arange(1024))


def readline_byte(stream, timeout: float = 30) -> bytes:
    """One reply byte, bounded: a thread reads, the test waits at most ``timeout``."""
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(stream.read(1)), daemon=True)
    t.start()
    t.join(timeout)
    assert got and got[0], "no reply from the child"
    return got[0]


class SharedStruct(ctypes.Structure):
    """simpleIPC's shared struct, as a ported program lays it out: handles in byte slots."""

    _fields_ = [
        ("ready", ctypes.c_int32),
        ("nprocs", ctypes.c_int32),
        ("handles", (ctypes.c_ubyte * 64) * 2),
        ("done", ctypes.c_int32 * 4),
    ]


def _struct_consumer(name: str, rank: int) -> None:
    shm = posix_ipc.SharedMemory(name)
    region = mmap.mmap(shm.fd, ctypes.sizeof(SharedStruct))
    shm.close_fd()
    shared = SharedStruct.from_buffer(region)
    try:
        deadline = time.monotonic() + 30
        while not shared.ready:
            if time.monotonic() > deadline:
                raise SystemExit("never ready")
            time.sleep(0.001)
        for slot in range(2):
            # The byte slot itself (a ctypes array) is passed, as ported code would.
            ptr = hip.hipIpcOpenMemHandle(shared.handles[slot])
            data = hip.asarray(ptr, 4096)
            if data[rank] != slot + 1:
                raise SystemExit(f"rank {rank} slot {slot}: saw {data[rank]}")
            data[rank] = 100 + rank
            del data
            hip.hipIpcCloseMemHandle(ptr)
        shared.done[rank] = 1
    finally:
        del shared
        region.close()


@BOTH_TRANSPORTS
def test_handles_through_a_posix_ipc_shared_struct_to_spawned_interpreters(alloc):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    name = f"/hipipc-test-struct-{uuid.uuid4().hex[:12]}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, 0o600, ctypes.sizeof(SharedStruct))
    procs = []
    try:
        region = mmap.mmap(shm.fd, ctypes.sizeof(SharedStruct))
        shm.close_fd()
        shared = SharedStruct.from_buffer(region)
        ptrs = [alloc(4096), alloc(4096)]
        procs = [ctx.Process(target=_struct_consumer, args=(name, r)) for r in range(4)]
        for p in procs:
            p.start()
        for slot, ptr in enumerate(ptrs):
            hip.hipMemset(ptr, slot + 1, 4096)
            ctypes.memmove(shared.handles[slot], bytes(hip.hipIpcGetMemHandle(ptr)), 64)
        shared.nprocs = 4
        shared.ready = 1
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4
        assert list(shared.done) == [1] * 4
        for ptr in ptrs:
            assert read(ptr, 5) == bytes([100, 101, 102, 103, ptrs.index(ptr) + 1])
        del shared
        region.close()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        shm.unlink()


def test_exporter_script_and_helpers_agree():
    # Guards the helpers the other tests trust: the exporter's fill pattern and its sums.
    with Exporter([100, 300]) as exporter:
        for i, size in enumerate((100, 300)):
            assert exporter.command(f"sum {i}") == hashlib.sha256(pattern(i, size)).hexdigest()
