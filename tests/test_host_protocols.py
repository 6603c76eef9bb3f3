"""DeviceBuffer speaks numpy's host protocols: len, the buffer protocol, the array interface,
DLPack; every export is zero-copy and keeps the mapping alive after ``close``."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

import hipipc as hip


@pytest.fixture
def buf():
    b = hip.DeviceBuffer.allocate(4096)
    yield b
    b.close()


def test_len_is_the_size_in_bytes(buf):
    assert len(buf) == 4096 == buf.size
    buf.close()
    assert len(buf) == 4096  # kept after close, like size


def test_array_interface_is_a_zero_copy_writable_view(buf):
    iface = buf.__array_interface__
    assert iface["version"] == 3 and iface["shape"] == (4096,) and iface["typestr"] == "|u1"
    arr = np.asarray(buf)
    arr[:] = 7
    assert buf.asarray()[123] == 7 and arr.flags.writeable

    # Through the interface alone (what other array libraries use), without __array__.
    class Iface:
        __array_interface__ = buf.__array_interface__

    other = np.asarray(Iface())
    other[0] = 9
    assert buf.asarray()[0] == 9


def test_array_interface_view_outlives_close():
    b = hip.DeviceBuffer.allocate(1 << 16)
    b.asarray()[:] = 3
    arr = np.asarray(b)
    assert isinstance(arr.base, memoryview)  # built through the interface, not a copy
    b.close()
    del b
    gc.collect()
    assert int(arr.sum()) == 3 << 16  # the mapping lives as long as the array: no crash


def test_closed_buffer_refuses_every_protocol(buf):
    buf.close()
    for export in (
        lambda: np.asarray(buf),
        lambda: buf.__array_interface__,
        lambda: np.from_dlpack(buf),
        lambda: buf.__buffer__(0),
    ):
        with pytest.raises(hip.HipError) as err:
            export()
        assert err.value.code == hip.hipError_t.hipErrorInvalidValue


@pytest.mark.skipif(sys.version_info < (3, 12), reason="PEP 688 buffer protocol: Python 3.12+")
def test_memoryview_is_the_writable_bytes(buf):
    view = memoryview(buf)
    assert view.nbytes == len(buf) and not view.readonly and view.format == "B"
    view[10] = 42
    assert buf.asarray()[10] == 42
    assert bytes(buf)[10] == 42 and len(bytes(buf)) == 4096
    view.release()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="older Pythons only")
def test_memoryview_before_312_is_a_type_error_with_the_documented_way(buf):
    with pytest.raises(TypeError):
        memoryview(buf)
    view = memoryview(buf.asarray())  # the documented way on 3.10 and 3.11
    view[10] = 42
    assert buf.asarray()[10] == 42


def test_dlpack_bytes_and_typed_views(buf):
    assert buf.__dlpack_device__() == (1, 0)
    raw = np.from_dlpack(buf)
    assert raw.dtype == np.uint8 and raw.shape == (4096,)
    typed = np.from_dlpack(buf.asarray(np.float32, (32, 32)))
    assert typed.dtype == np.float32 and typed.shape == (32, 32)
    typed[1, 1] = 2.5
    assert buf.asarray(np.float32)[33] == 2.5 and raw.view(np.float32)[33] == 2.5
