"""DeviceBuffer: the object API, pickling, and sending through multiprocessing Queue and Pool."""

from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import os
import pickle
import sys
import time

import numpy as np
import pytest

import hipipc as hip
from hipipc.registry import get_registry
from hipipc.store import HandleStore

SPAWN = mp.get_context("spawn")


def store_names() -> set[str]:
    return {name for name, _info, _st in HandleStore().entries()}


def code_of(excinfo) -> hip.hipError_t:
    return excinfo.value.code


# -- the object on its own -------------------------------------------------------------


def test_allocate_view_close_is_idempotent():
    before = get_registry().live_counts()
    with hip.DeviceBuffer.allocate(4096) as buf:
        assert buf.is_owner and not buf.closed
        assert buf.size == buf.nbytes == 4096 and buf.device == 0
        assert hip.hipMemGetAddressRange(buf.ptr) == (buf.ptr, 4096)
        view = buf.asarray(np.int32)
        assert view.shape == (1024,)
        view[:] = np.arange(1024)
        assert "owner" in repr(buf) and "ptr=" in repr(buf)
    assert buf.closed and "closed" in repr(buf)
    buf.close()  # idempotent
    with pytest.raises(hip.HipError) as exc:
        _ = buf.ptr
    assert code_of(exc) == hip.hipError_t.hipErrorInvalidValue
    # A view outlives close: the mapping goes with the last view, never under it.
    assert view[1023] == 1023
    assert get_registry().live_counts() == before


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True, None])
def test_allocate_rejects_bad_sizes(bad):
    with pytest.raises(hip.HipError) as exc:
        hip.DeviceBuffer.allocate(bad)
    assert code_of(exc) == hip.hipError_t.hipErrorInvalidValue


def test_direct_construction_is_refused():
    with pytest.raises(TypeError):
        hip.DeviceBuffer()


def test_asarray_shapes_and_numpy_protocols():
    with hip.DeviceBuffer.allocate(64) as buf:
        m = buf.asarray(np.float64, (2, 4))
        m[:] = 1.5
        assert np.asarray(buf).dtype == np.uint8 and np.asarray(buf).size == 64
        with pytest.raises(hip.HipError):
            buf.asarray(np.float64, (3, 4))  # 96 bytes do not fit
        copied = np.array(buf, copy=True)
        copied[:] = 0
        assert m[0, 0] == 1.5  # the copy is a copy
        assert np.asarray(buf, dtype=np.float32)[0] == float(np.asarray(buf)[0])  # a cast
        with pytest.raises(ValueError):
            np.asarray(buf, dtype=np.float32, copy=False)


def test_dlpack_is_zero_copy_host_memory():
    with hip.DeviceBuffer.allocate(32) as buf:
        assert buf.__dlpack_device__() == (1, 0)  # kDLCPU, device 0
        viewed = np.from_dlpack(buf)
        viewed[:] = 7
        assert buf.asarray()[5] == 7
        assert viewed.__array_interface__["data"][0] == buf.ptr


def test_garbage_collection_frees_an_owner():
    before = get_registry().live_counts()
    buf = hip.DeviceBuffer.allocate(4096)
    name = buf.handle.segment_name
    assert name in store_names()
    del buf
    gc.collect()
    assert get_registry().live_counts() == before
    assert name not in store_names()


def test_close_after_a_bare_free_raises_but_the_destructor_stays_quiet():
    buf = hip.DeviceBuffer.allocate(128)
    hip.hipFree(buf.ptr)  # released behind the object's back
    with pytest.raises(hip.HipError):
        buf.close()
    quiet = hip.DeviceBuffer.allocate(128)
    hip.hipFree(quiet.ptr)
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        del quiet  # __del__ -> close -> hipFree raises inside; must be swallowed
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []


# -- pickling --------------------------------------------------------------------------


def test_pickle_in_the_exporting_process_gives_an_alias_that_keeps_the_owner():
    before = get_registry().live_counts()
    owner = hip.DeviceBuffer.allocate(1024)
    owner.asarray()[:] = 9
    name = owner.handle.segment_name
    alias = pickle.loads(pickle.dumps(owner))
    clone = copy.deepcopy(owner)
    for other in (alias, clone):
        assert not other.is_owner and other.ptr == owner.ptr and other.handle == owner.handle
        assert "alias" in repr(other)
    clone.close()
    assert not owner.closed  # closing an alias does not free
    del owner
    gc.collect()
    assert alias.asarray()[0] == 9  # the alias kept the owner alive
    assert name in store_names()
    alias.close()
    gc.collect()
    assert name not in store_names()
    assert get_registry().live_counts() == before


def test_pickling_a_closed_buffer_says_so():
    buf = hip.DeviceBuffer.allocate(64)
    buf.close()
    with pytest.raises(hip.HipError) as exc:
        pickle.dumps(buf)
    assert code_of(exc) == hip.hipError_t.hipErrorInvalidValue
    assert "closed" in str(exc.value)


def test_handle_from_bare_export_in_same_process_is_invalid_context():
    ptr = hip.hipMalloc(256)
    try:
        handle = hip.hipIpcGetMemHandle(ptr)
        with pytest.raises(hip.HipError) as exc:
            hip.DeviceBuffer.from_handle(bytes(handle))
        assert code_of(exc) == hip.hipError_t.hipErrorInvalidContext
    finally:
        hip.hipFree(ptr)


def test_close_revokes_the_handle_but_a_pickle_already_made_still_opens():
    # close() keeps CUDA's immediate revocation of the handle; the pickle's one-time ticket
    # (send-and-drop, hipipc.buffer) stays valid until consumed, then the name is gone.
    buf = hip.DeviceBuffer.allocate(64)
    buf.asarray()[:] = 5
    data = pickle.dumps(buf)
    raw = bytes(buf.handle)
    buf.close()
    with pytest.raises(hip.HipError) as exc:
        hip.hipIpcOpenMemHandle(raw)
    assert code_of(exc) == hip.hipError_t.hipErrorInvalidResourceHandle
    got = pickle.loads(data)
    assert not got.is_owner and got.asarray()[63] == 5
    got.close()
    with pytest.raises(hip.HipError) as exc:  # the ticket was consumed by the first load
        pickle.loads(data)
    assert code_of(exc) == hip.hipError_t.hipErrorInvalidResourceHandle


def test_importer_refuses_sharing_and_inherited_owner_is_inert_after_fork():
    # An import only exists in another process; a forked child is the cheapest one.
    with hip.DeviceBuffer.allocate(64) as owner:
        raw = pickle.dumps(owner)
        pid = os.fork()
        if pid == 0:  # child: exit code carries the result, never returns into pytest
            code = 1
            try:
                imp = pickle.loads(raw)
                ok = not imp.is_owner and imp.export() == owner.handle
                try:
                    imp.export(share="all")
                except hip.HipError as exc:
                    ok &= exc.code == hip.hipError_t.hipErrorInvalidValue
                else:
                    ok = False
                try:
                    owner.asarray()  # inherited from the parent: not usable here
                except hip.HipError as exc:
                    ok &= exc.code == hip.hipError_t.hipErrorInvalidContext
                else:
                    ok = False
                owner.close()  # inert here: must not free the parent's memory
                imp.close()
                code = 0 if ok and get_registry().live_counts() == (0, 0) else 3
            finally:
                os._exit(code)
        assert wait_child(pid) == 0
        assert owner.asarray()[0] == 0 and owner.handle.segment_name in store_names()


def wait_child(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


# -- across processes: Queue and Pool --------------------------------------------------


def _queue_consumer(inbox, outbox) -> None:
    try:
        replies = []
        for _ in range(2):
            buf = inbox.get(timeout=30)
            data = buf.asarray(np.float32)
            replies.append((buf.is_owner, float(data.sum())))
            data *= 3
            del data, buf  # dropping the buffer closes it
        gc.collect()
        outbox.put(("ok", replies, get_registry().live_counts()))
    except BaseException as exc:
        outbox.put(("error", repr(exc), None))


def test_buffers_through_a_queue_arrive_open_and_close_when_dropped():
    bufs = [hip.DeviceBuffer.allocate(4096) for _ in range(2)]
    names = {b.handle.segment_name for b in bufs}
    for i, b in enumerate(bufs):
        b.asarray(np.float32)[:] = i + 1
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=_queue_consumer, args=(inbox, outbox))
    proc.start()
    try:
        for b in bufs:
            inbox.put(b)
        # The owner keeps its buffers until the consumer answers: Queue.put is asynchronous.
        status, replies, counts = outbox.get(timeout=60)
        assert status == "ok", replies
        assert replies == [(False, 1024.0), (False, 2048.0)]
        assert counts == (0, 0)  # the consumer closed both imports when it dropped them
        for i, b in enumerate(bufs):
            assert np.all(b.asarray(np.float32) == 3 * (i + 1))
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        for b in bufs:
            b.close()
    assert not names & store_names()


def _pool_work(buf, value):
    arr = buf.asarray(np.int64)
    before = int(arr[0])
    arr[:] = value
    return os.getpid(), before, buf.is_owner


def _pool_live_counts(_):
    gc.collect()
    return get_registry().live_counts()


def _pool_echo(buf):
    return buf


def test_buffers_through_a_pool_and_back():
    bufs = [hip.DeviceBuffer.allocate(256) for _ in range(4)]
    names = {b.handle.segment_name for b in bufs}
    for i, b in enumerate(bufs):
        b.asarray(np.int64)[:] = i
    try:
        with SPAWN.Pool(2) as pool:
            results = pool.starmap_async(
                _pool_work, [(b, 100 + i) for i, b in enumerate(bufs)], chunksize=1
            ).get(timeout=60)
            assert [r[1] for r in results] == [0, 1, 2, 3]
            assert not any(r[2] for r in results) and os.getpid() not in {r[0] for r in results}
            for i, b in enumerate(bufs):
                assert np.all(b.asarray(np.int64) == 100 + i)
            # Workers dropped their buffers after each task: no import is left open.
            counts = pool.map_async(_pool_live_counts, range(4), chunksize=1).get(timeout=60)
            assert set(counts) == {(0, 0)}
            # A buffer sent back to its exporter arrives as an alias of the owner.
            back = pool.apply_async(_pool_echo, (bufs[0],)).get(timeout=60)
            assert not back.is_owner and back.ptr == bufs[0].ptr
            back.close()
    finally:
        for b in bufs:
            b.close()
    assert not names & store_names()
