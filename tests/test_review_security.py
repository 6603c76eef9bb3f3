"""Adversarial review: what a hostile peer (same uid, a grantee, a hand-made pickle) can do.

Each test is a regression test for a finding: it failed before the fix it names.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from _proc import Exporter, child_env, in_fork, readline, store_names

import hipipc as hip
from hipipc.arrays import _rebuild_array
from hipipc.buffer import DeviceBuffer, _rebuild, _rebuild_empty
from hipipc.store import _IDENTITY, HandleStore
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


@pytest.mark.parametrize(
    "offset, shape, strides",
    [
        (2**70, (1,), (1,)),  # before: OverflowError
        (0, (1,), (2**70,)),
        (-1, (1,), (1,)),
        (60, (8,), (1,)),
        (0, (2,), (-1,)),
    ],
)
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


@pytest.mark.parametrize("device", ["0", -1, 2**40, None])
def test_a_pickled_empty_buffer_on_no_possible_device_is_refused(device):
    # Before: accepted, and buf.device returned whatever the pickle said.
    with pytest.raises(hip.HipError) as info:
        _rebuild_empty(device)
    assert info.value.code == E.hipErrorInvalidDevice


def test_a_good_pickle_still_round_trips(buf):
    buf.asarray(np.uint8)[:] = np.arange(64, dtype=np.uint8)
    arr = pickle.loads(pickle.dumps(buf.asarray(np.uint32)[3:9]))
    assert list(arr) == list(buf.asarray(np.uint32)[3:9])
    view = pickle.loads(pickle.dumps(buf[3:9]))
    assert view.size == 6
    empty = pickle.loads(pickle.dumps(DeviceBuffer.allocate(0)))
    assert empty.size == 0
    del arr, view, empty


# -- the mailbox: names anyone can plant in /dev/shm, counters any process of the uid writes


@pytest.mark.parametrize("plant", ["directory", "symlink", "fifo"])
def test_a_name_planted_in_dev_shm_is_not_a_mailbox(plant):
    # Before: ValueError (directory), OSError ELOOP (symlink), "not found" after the timeout
    # (FIFO); anyone can plant these under a name they know (/dev/shm is world-writable).
    name = f"/hipipc-review-{uuid.uuid4().hex[:8]}"
    path = "/dev/shm" + name
    {"directory": os.mkdir, "fifo": os.mkfifo, "symlink": lambda p: os.symlink("/etc/passwd", p)}[
        plant
    ](path)
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


# -- liveness: a live exporter must never be declared dead -----------------------------

MAIN_THREAD_EXITS = """
import ctypes, os, sys, threading
import hipipc as hip
ptr = hip.hipMalloc(4096)
raw = bytes(hip.hipIpcGetMemHandle(ptr))
def worker():
    sys.stdin.readline()  # until the test is done: the process runs on in this thread
    hip.hipFree(ptr)
    os._exit(0)
threading.Thread(target=worker).start()
sys.stdout.write(raw.hex() + "\\n")
sys.stdout.flush()
ctypes.CDLL(None).pthread_exit(None)  # the main thread only; the leader now shows "Z"
"""


def test_an_exporter_whose_main_thread_exited_is_alive():
    # Before: /proc/<pid>/stat says "Z" for a leader whose threads still run, so the first open
    # declared the exporter dead, refused the handle and unlinked a live export (gc too).
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_THREAD_EXITS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        raw = bytes.fromhex(readline(proc.stdout, 60, "exporter"))
        deadline = time.monotonic() + 30
        while True:  # the leader turns "Z" once its pthread_exit has run
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            assert time.monotonic() < deadline, "the exporter's main thread did not exit"
            time.sleep(0.01)
        name = hip.IpcMemHandle(raw).segment_name
        assert name not in HandleStore().collect(dry_run=True)
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)
        assert name in store_names()
        proc.stdin.write(b"done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        assert name not in store_names()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            HandleStore().collect()  # a failed run leaves no segment of the killed exporter


NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching a child to another uid needs root"
)


def _forged_export_of_an_undumpable_exporter() -> list[str]:
    """In a forked child: become nobody, hide our maps (not dumpable, as every process that
    dropped privileges is), export with share=all, let a 'grantee' write a dead pid into the
    header; another process of this user (forked before the export, so that it does not map
    the segment itself) runs gc and opens the handle: [removed, open outcome, still named]."""
    import ctypes
    import json
    import select

    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    gc_pid = os.fork()
    if gc_pid == 0:  # pragma: no cover - the gc process
        try:
            select.select([go_r], [], [], 60)
            raw = os.read(go_r, 64)
            removed = HandleStore().collect()
            try:  # an import by this user: refused and reclaimed before the fix
                hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))
                opened = "opened"
            except hip.HipError as exc:
                opened = exc.detail
            os.write(done_w, json.dumps([removed, opened]).encode())
        finally:
            os._exit(0)
    store = HandleStore()
    ptr = hip.hipMalloc(4096)
    try:
        handle = hip.hipIpcGetMemHandle(ptr, share="all")
        with open("/proc/sys/kernel/pid_max") as f:
            dead_pid = int(f.read()) + 1  # in range, but no process can have it
        fd = os.open(os.path.join(store.own_path(), handle.segment_name), os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<I", dead_pid), _IDENTITY.size)
        finally:
            os.close(fd)
        os.write(go_w, bytes(handle))
        assert select.select([done_r], [], [], 60)[0], "gc did not answer"
        removed, opened = json.loads(os.read(done_r, 65536))
        still = handle.segment_name in os.listdir(store.own_path())
        return [removed, opened, still]
    finally:
        os.waitpid(gc_pid, 0)
        hip.hipFree(ptr)
        shutil.rmtree(store.own_path(), ignore_errors=True)


@needs_root
def test_a_forged_dead_pid_cannot_get_an_undumpable_exporters_live_export_swept():
    # Before: gc (and any open of the handle by this user) could not read the exporter's
    # /proc maps, took "no process maps it" for proof, and unlinked the live export.
    assert in_fork(_forged_export_of_an_undumpable_exporter, timeout=60) == [[], "opened", True]


def _child_closes_all_then_opens(raw: bytes, inherited: list[int]) -> str:
    """In a forked child: close every inherited pidfd number (as a daemon closes all its
    descriptors), reuse one for a file of our own, open the handle, check the file's fd."""
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    mine = os.open("/dev/null", os.O_RDONLY)
    while mine < max(inherited):  # fill the numbers up to a former pidfd's
        mine = os.open("/dev/null", os.O_RDONLY)
    ptr = hip.hipIpcOpenMemHandle(raw)
    hip.hipIpcCloseMemHandle(ptr)
    os.fstat(mine)  # EBADF if hipipc closed a descriptor it does not own
    return "ok"


def test_a_forked_child_never_closes_descriptors_it_reused_for_its_own_files():
    # Before: the child inherited the parent's pidfd cache; a child that closed all its
    # descriptors and reused the numbers had its own file closed by the next open.
    from hipipc.liveness import exporters

    with Exporter([4096]) as exp:
        raw = exp.handles[0]
        hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))  # caches the exporter's pidfd
        inherited = [fd for fd, _ in exporters.cache.values()]
        assert inherited
        assert in_fork(_child_closes_all_then_opens, raw, inherited) == "ok"


def test_polling_a_mailbox_whose_lock_a_peer_holds_ends_by_the_callers_timeout():
    # Before: each poll took the lock with its own 5 s grace, so poll(timeout=0.5) took 5 s.
    with Mailbox.create(slots=1, parties=2) as box:
        box._lock_sem.acquire()  # a peer stuck inside put/get
        try:
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                box.poll(0, timeout=0.5)
            assert time.monotonic() - began < 4.0
        finally:
            box._lock_sem.release()
