"""Adversarial review: what a hostile peer (same uid, a grantee, a hand-made pickle) can do.

Each test is a regression test for a finding: it failed before the fix it names.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import time
import uuid

import numpy as np
import pytest
from _proc import store_names

import hipipc as hip
from hipipc.arrays import _rebuild_array
from hipipc.buffer import DeviceBuffer, _rebuild
from hipipc.transport import Mailbox

E = hip.hipError_t


@pytest.fixture
def buf():
    b = DeviceBuffer.allocate(64)
    yield b
    b.close()


# -- hand-made pickles -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["|O", [("a", "<u8"), ("b", "|O")]])
def test_a_pickled_array_of_python_objects_is_refused(buf, dtype):
    # Before: the receiver got an object array whose "pointers" were the shared bytes, and
    # touching an element segfaulted (any peer who can write the memory picks the pointer).
    buf.asarray(np.uint64)[:] = 0x4141414141414140
    raw = bytes(buf.export())
    before = store_names()
    with pytest.raises(hip.HipError) as info:
        _rebuild_array(raw, None, 0, (1,), (16,), dtype)
    assert info.value.code == E.hipErrorInvalidValue and "Python objects" in info.value.detail
    assert store_names() == before


@pytest.mark.parametrize("offset, shape, strides", [
    (2**70, (1,), (1,)),  # before: OverflowError
    (0, (1,), (2**70,)),
    (-1, (1,), (1,)),
    (60, (8,), (1,)),
    (0, (2,), (-1,)),
])
def test_a_pickled_array_outside_its_allocation_is_refused(buf, offset, shape, strides):
    with pytest.raises(hip.HipError) as info:
        _rebuild_array(bytes(buf.export()), None, offset, shape, strides, "|u1")
    assert info.value.code == E.hipErrorInvalidValue


@pytest.mark.parametrize("offset, size", [(1.5, 4), ("a", 4), (0, "x"), (0, 4.0)])
def test_a_pickled_view_with_non_integer_bounds_is_refused(buf, offset, size):
    # Before: TypeError from deep inside (slice indices, comparisons).
    with pytest.raises(hip.HipError) as info:
        _rebuild(bytes(buf.export()), None, offset, size)
    assert info.value.code == E.hipErrorInvalidValue


@pytest.mark.parametrize("ticket", ["zz", b"", b"x" * 15, 12, bytearray(16)])
def test_a_malformed_ticket_is_refused(buf, ticket):
    # Before: TypeError ("Strings must be encoded", "buffer API required"), or b"" accepted.
    raw = bytes(buf.export())
    with pytest.raises(hip.HipError) as info:
        _rebuild(raw, ticket, 0, 64)
    assert info.value.code == E.hipErrorInvalidValue
    ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
    try:
        from hipipc.events import _rebuild_event
        with pytest.raises(hip.HipError) as info:
            _rebuild_event(bytes(hip.hipIpcGetEventHandle(ev)), ticket)
        assert info.value.code == E.hipErrorInvalidValue
    finally:
        hip.hipEventDestroy(ev)


def test_a_good_pickle_still_round_trips(buf):
    buf.asarray(np.uint8)[:] = np.arange(64, dtype=np.uint8)
    arr = pickle.loads(pickle.dumps(buf.asarray(np.uint32)[3:9]))
    assert list(arr) == list(buf.asarray(np.uint32)[3:9])
    view = pickle.loads(pickle.dumps(buf[3:9]))
    assert view.size == 6
    del arr, view


# -- the mailbox: names anyone can plant in /dev/shm, counters any process of the uid writes


@pytest.mark.parametrize("plant", ["directory", "symlink", "fifo"])
def test_a_name_planted_in_dev_shm_is_not_a_mailbox(plant):
    # Before: ValueError (directory), OSError ELOOP (symlink), "not found" after the timeout
    # (FIFO); anyone can plant these under a name they know (/dev/shm is world-writable).
    name = f"/hipipc-review-{uuid.uuid4().hex[:8]}"
    path = "/dev/shm" + name
    {"directory": os.mkdir, "fifo": os.mkfifo,
     "symlink": lambda p: os.symlink("/etc/passwd", p)}[plant](path)
    try:
        with pytest.raises(hip.HipError) as info:
            Mailbox.attach(name, timeout=5)
        assert info.value.code == E.hipErrorInvalidResourceHandle
        assert "not a hipipc mailbox" in info.value.detail
    finally:
        (os.rmdir if plant == "directory" else os.unlink)(path)


@pytest.mark.parametrize("parties", [0, 0xFFFFFFFF])
def test_a_mailbox_header_with_impossible_parties_is_refused(parties):
    # Before: attached; with 2**32-1 parties no barrier round could ever complete.
    with Mailbox.create(slots=1, parties=2) as box:
        struct.pack_into("<I", box._map, 16, parties)
        with pytest.raises(hip.HipError) as info:
            Mailbox.attach(box.name)
        assert info.value.code == E.hipErrorInvalidResourceHandle


def test_a_barrier_withdrawal_after_the_count_was_zeroed_times_out_cleanly():
    # Before: struct.error ("argument out of range") packing a count of -1.
    with Mailbox.create(slots=1, parties=2) as box:
        def zero() -> None:
            time.sleep(0.2)
            struct.pack_into("<I", box._map, 20, 0)

        writer = threading.Thread(target=zero)
        writer.start()
        try:
            with pytest.raises(TimeoutError):
                box.wait(timeout=2)
        finally:
            writer.join(timeout=30)
        assert struct.unpack_from("<I", box._map, 20)[0] == 0
