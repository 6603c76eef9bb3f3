"""Handle passing: the shared-memory Mailbox and its barrier, message queues, sockets, pipes."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import socket
import threading
import time

import numpy as np
import posix_ipc
import pytest

import hipipc as hip
from hipipc.handle import HandleKind

SPAWN = mp.get_context("spawn")


def shm_names_with(token: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if token in n]


def fake_event_handle() -> hip.IpcEventHandle:
    return hip.IpcEventHandle.new(HandleKind.HOST_EVENT, 64, 0, os.geteuid())


def fake_mem_handle() -> hip.IpcMemHandle:
    return hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())


# -- Mailbox in one process ------------------------------------------------------------


def test_mailbox_slots_roundtrip_and_names_are_unlinked():
    mem, event = fake_mem_handle(), fake_event_handle()
    with hip.Mailbox.create(slots=3, parties=2) as box:
        token = box.name.lstrip("/")
        assert box.is_creator and box.slots == 3 and box.parties == 2
        # One segment and three semaphores, all of them named after the mailbox.
        assert sorted(shm_names_with(token)) == sorted(
            [token] + [f"sem.{token}-{s}" for s in ("lock", "gate0", "gate1")]
        )
        assert box.get(0) == (None, None)
        box.put(0, mem=mem)
        box.put(2, mem=bytes(mem), event=event)
        with hip.Mailbox.attach(box.name) as other:
            assert not other.is_creator and other.slots == 3
            assert other.get(0) == (mem, None)
            got_mem, got_event = other.get(2)
            assert type(got_mem) is hip.IpcMemHandle and type(got_event) is hip.IpcEventHandle
            assert (got_mem, got_event) == (mem, event)
            other.clear(2)
        assert box.get(2) == (None, None)
    assert box.closed
    box.close()  # idempotent
    assert shm_names_with(token) == []


def test_mailbox_rejects_bad_slots_handles_and_sizes():
    with hip.Mailbox.create(slots=1) as box:
        for bad in (1, -1, "0", True):
            with pytest.raises(hip.HipError) as exc:
                box.put(bad, mem=fake_mem_handle())
            assert exc.value.code == hip.hipError_t.hipErrorInvalidValue
        with pytest.raises(hip.HipError):
            box.put(0, mem=b"\x00" * 64)  # not a handle
        with pytest.raises(hip.HipError):
            box.put(0, mem=fake_event_handle())  # an event handle in the memory side
        with pytest.raises(hip.HipError):
            box.put(0, event=b"short")
    for kwargs in (
        {"slots": 0},
        {"parties": 0},
        {"slots": 1.5},
        {"name": "no-slash"},
        {"name": "/a/b"},
    ):
        with pytest.raises(hip.HipError) as exc:
            hip.Mailbox.create(**kwargs)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidValue
    with pytest.raises(hip.HipError):
        box.get(0)  # closed


def test_mailbox_name_clash_leaves_the_existing_one_alone():
    with hip.Mailbox.create() as box:
        with pytest.raises(hip.HipError) as exc:
            hip.Mailbox.create(name=box.name)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidValue
        assert "exists" in str(exc.value)
        with hip.Mailbox.attach(box.name) as again:  # still complete and usable
            again.put(0, mem=fake_mem_handle())


def test_attach_missing_waits_then_not_found_and_finds_a_late_creator():
    name = f"/hipipc-test-late-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    with pytest.raises(hip.HipError) as exc:
        hip.Mailbox.attach(name, timeout=0.2)
    assert exc.value.code == hip.hipError_t.hipErrorNotFound
    assert 0.15 < time.monotonic() - t0 < 5
    made = []
    timer = threading.Timer(0.2, lambda: made.append(hip.Mailbox.create(name=name)))
    timer.start()
    try:
        with hip.Mailbox.attach(name, timeout=10) as box:
            assert box.slots == 1
    finally:
        timer.join(10)
        for box in made:
            box.close()
    assert shm_names_with(name.lstrip("/")) == []


def test_attach_refuses_a_segment_that_is_not_a_mailbox():
    name = f"/hipipc-test-notmb-{os.getpid()}-{time.monotonic_ns()}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, 0o600, 4096)
    try:
        os.pwrite(shm.fd, b"NOTAMBOX" + bytes(56), 0)
        with pytest.raises(hip.HipError) as exc:
            hip.Mailbox.attach(name)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidResourceHandle
    finally:
        shm.close_fd()
        shm.unlink()


def test_dropped_creator_unlinks_its_names():
    box = hip.Mailbox.create()
    token = box.name.lstrip("/")
    assert shm_names_with(token)
    del box
    gc.collect()
    assert shm_names_with(token) == []


# -- the barrier -----------------------------------------------------------------------


def test_barrier_timeout_withdraws_and_the_barrier_stays_usable():
    with hip.Mailbox.create(parties=2) as box:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="1 of 2"):
            box.wait(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 5
        # Had the timed-out party stayed counted, the first thread would pass alone and the
        # second would time out.
        results: list = []

        def party():
            try:
                results.append(box.wait(timeout=10))
            except BaseException as exc:  # reported below
                results.append(exc)

        threads = [threading.Thread(target=party) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert results == [0, 0]
        with pytest.raises(hip.HipError):
            box.wait(timeout=-1)


def test_barrier_is_reusable_over_many_rounds():
    rounds, parties = 40, 3
    seen: list[list[int]] = [[] for _ in range(parties)]
    with hip.Mailbox.create(parties=parties) as box:

        def party(i):
            for _ in range(rounds):
                seen[i].append(box.wait(timeout=10))

        threads = [threading.Thread(target=party, args=(i,)) for i in range(parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
    assert seen == [list(range(rounds))] * parties


def test_barrier_stays_consistent_when_parties_keep_timing_out():
    parties, attempts = 3, 40
    passes = [0] * parties
    with hip.Mailbox.create(parties=parties) as box:

        def party(i):
            rng = random.Random(i)
            for _ in range(attempts):
                time.sleep(rng.choice([0, 0, 0.001, 0.004]))
                try:
                    box.wait(timeout=rng.choice([0.0005, 0.002, 0.01]))
                    passes[i] += 1
                except TimeoutError:
                    pass

        threads = [threading.Thread(target=party, args=(i,)) for i in range(parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Every round that opened let each party through exactly once.
        assert len(set(passes)) == 1, passes
        # No stale arrival and no stray pass is left: a clean round needs all three again.
        with pytest.raises(TimeoutError):
            box.wait(timeout=0.05)
        results: list = []
        clean = [
            threading.Thread(target=lambda: results.append(box.wait(timeout=10)))
            for _ in range(parties)
        ]
        for t in clean:
            t.start()
        for t in clean:
            t.join(15)
        assert len(results) == parties and len(set(results)) == 1


def _mailbox_peer(name: str, rank: int, parties: int) -> None:
    box = hip.Mailbox.attach(name, timeout=10)
    try:
        if rank == 1:
            # Nobody else waits yet (they poll for slot 1 first): this times out, and must
            # not break the next round.
            try:
                box.wait(timeout=0.2)
                raise SystemExit(10)
            except TimeoutError:
                pass
        with hip.DeviceBuffer.allocate(4096) as mine:
            mine.asarray(np.int32)[:] = rank
            box.put(rank, mem=mine.handle)
            box.poll(1, timeout=20)
            box.wait(timeout=20)  # round 0: every handle is in the mailbox
            for peer in range(parties):
                if peer == rank:
                    continue
                mem, _ = box.get(peer)
                with hip.DeviceBuffer.open(mem) as theirs:
                    if not np.all(theirs.asarray(np.int32) == peer):
                        raise SystemExit(11)
            box.wait(timeout=20)  # round 1: everybody has read; now free
    finally:
        box.close()


def test_mailbox_across_processes_exchanges_handles_with_barriers():
    parties = 3
    with hip.Mailbox.create(slots=parties, parties=parties) as box:
        procs = [SPAWN.Process(target=_mailbox_peer, args=(box.name, r, parties)) for r in (1, 2)]
        for p in procs:
            p.start()
        try:
            with hip.DeviceBuffer.allocate(4096) as mine:
                mine.asarray(np.int32)[:] = 0
                box.put(0, mem=mine.handle)
                box.poll(1, timeout=30)  # rank 1 publishes after its lone wait timed out
                assert box.wait(timeout=30) == 0
                for peer in (1, 2):
                    mem, _ = box.get(peer)
                    with hip.DeviceBuffer.open(mem) as theirs:
                        assert np.all(theirs.asarray(np.int32) == peer)
                assert box.wait(timeout=30) == 1
            for p in procs:
                p.join(30)
            assert [p.exitcode for p in procs] == [0, 0]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)


# -- one handle per message ------------------------------------------------------------


def test_parse_handle_picks_the_type_and_rejects_garbage():
    mem, event = fake_mem_handle(), fake_event_handle()
    assert type(hip.parse_handle(bytes(mem))) is hip.IpcMemHandle
    assert type(hip.parse_handle(bytearray(bytes(event)))) is hip.IpcEventHandle
    for bad in (b"", b"x" * 63, b"x" * 64, bytes(65), 12):
        with pytest.raises(hip.HipError) as exc:
            hip.parse_handle(bad)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidValue


def test_unsupported_channel_is_invalid_value():
    with pytest.raises(hip.HipError):
        hip.send_handle(object(), fake_mem_handle())
    with pytest.raises(hip.HipError):
        hip.recv_handle([], timeout=0)


def test_message_queue_roundtrip_timeout_and_bad_message():
    mq = hip.create_handle_queue(max_messages=4)
    try:
        assert mq.max_message_size == 64
        mem, event = fake_mem_handle(), fake_event_handle()
        hip.send_handle(mq, mem)
        hip.send_handle(mq, bytes(event))
        assert hip.recv_handle(mq, timeout=5) == mem
        assert type(hip.recv_handle(mq, timeout=5)) is hip.IpcEventHandle
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            hip.recv_handle(mq, timeout=0.1)
        assert time.monotonic() - t0 < 5
        mq.send(b"short")
        with pytest.raises(hip.HipError) as exc:
            hip.recv_handle(mq, timeout=1)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidValue
        for _ in range(4):
            hip.send_handle(mq, mem)
        with pytest.raises(TimeoutError):
            hip.send_handle(mq, mem, timeout=0.05)  # full
        with pytest.raises(hip.HipError):
            hip.create_handle_queue(mq.name)  # exists
    finally:
        posix_ipc.unlink_message_queue(mq.name)
        mq.close()


def _mq_consumer(inbox: str, outbox: str) -> None:
    rx, tx = posix_ipc.MessageQueue(inbox), posix_ipc.MessageQueue(outbox)
    try:
        handle = hip.recv_handle(rx, timeout=20)
        with hip.DeviceBuffer.open(handle) as buf:
            buf.asarray(np.uint8)[:] += 1
        hip.send_handle(tx, handle, timeout=20)  # "done" back to the parent
    finally:
        rx.close()
        tx.close()


def test_message_queue_across_processes():
    to_child, to_parent = hip.create_handle_queue(), hip.create_handle_queue()
    proc = SPAWN.Process(target=_mq_consumer, args=(to_child.name, to_parent.name))
    try:
        with hip.DeviceBuffer.allocate(100) as buf:
            buf.asarray()[:] = 41
            proc.start()
            hip.send_handle(to_child, buf.handle, timeout=5)
            assert hip.recv_handle(to_parent, timeout=30) == buf.handle
            assert np.all(buf.asarray() == 42)
        proc.join(20)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        for mq in (to_child, to_parent):
            posix_ipc.unlink_message_queue(mq.name)
            mq.close()


def test_socket_framing_partial_timeout_eof_and_truncation():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)  # no test step can hang
    with a, b:
        mem = fake_mem_handle()
        raw = bytes(mem)
        hip.send_handle(a, mem, timeout=5)
        assert hip.recv_handle(b, timeout=5) == mem
        # A handle split over several writes is reassembled.
        sender = threading.Thread(
            target=lambda: [
                a.sendall(raw[i : i + 10]) or time.sleep(0.01) for i in range(0, 64, 10)
            ]
        )
        sender.start()
        assert hip.recv_handle(b, timeout=10) == mem
        sender.join(10)
        assert b.gettimeout() == 10  # restored
        with pytest.raises(TimeoutError):
            hip.recv_handle(b, timeout=0.1)
        a.sendall(raw[:20])
        with pytest.raises(TimeoutError, match="20 bytes of a frame so far"):
            hip.recv_handle(b, timeout=0.1)
        a.sendall(raw[20:50])  # the next receive continues the frame, then meets EOF
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(hip.HipError) as exc:
            hip.recv_handle(b, timeout=5)
        assert exc.value.code == hip.hipError_t.hipErrorInvalidValue
        with pytest.raises(EOFError):
            hip.recv_handle(b, timeout=5)


def test_socket_to_a_forked_child_opens_the_memory():
    a, b = socket.socketpair()
    with a, b, hip.DeviceBuffer.allocate(64) as buf:
        buf.asarray()[:] = 5
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                a.close()
                with hip.DeviceBuffer.open(hip.recv_handle(b, timeout=20)) as mine:
                    mine.asarray()[:] *= 2
                b.sendall(b"k")
                code = 0
            finally:
                os._exit(code)
        hip.send_handle(a, buf.handle, timeout=5)
        a.settimeout(20)
        assert a.recv(1) == b"k"
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert np.all(buf.asarray() == 10)


def test_pipe_connection_roundtrip_and_bad_message():
    left, right = SPAWN.Pipe()
    with left, right:
        event = fake_event_handle()
        hip.send_handle(left, event)
        assert hip.recv_handle(right, timeout=5) == event
        with pytest.raises(TimeoutError):
            hip.recv_handle(right, timeout=0.05)
        left.send_bytes(b"y" * 100)
        with pytest.raises(hip.HipError):
            hip.recv_handle(right, timeout=5)
