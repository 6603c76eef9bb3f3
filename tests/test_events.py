"""Events and IPC events on the host backend (issue 3): CUDA's record/query/synchronize rules,
timing, flags, handle validation, revocation, and ordering between spawned processes.

Every cross-process wait is bounded (pipe polls, joins and the ``timeout=`` keyword), peers
are killed at teardown if still alive, and their exit codes are checked.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

import hipipc as hip

E = hip.hipError_t
SPAWN = mp.get_context("spawn")
ROOT = Path(__file__).resolve().parent.parent
LIMIT = 15.0  # the bound on every wait for another process
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
N = 1 << 20  # bytes of the buffers the ordering tests hand over
STALE, FINAL = 0x11, 0x22
REJECTED = (E.hipErrorInvalidValue, E.hipErrorInvalidResourceHandle)


def code_of(excinfo: pytest.ExceptionInfo) -> E:
    return excinfo.value.code


def store_entries() -> list[str]:
    path = os.environ["HIPIPC_STORE"].replace("{uid}", str(os.geteuid()))
    return os.listdir(path) if os.path.isdir(path) else []


# -- spawned peers ---------------------------------------------------------------------


def recv(conn, timeout: float = LIMIT):
    """The next message from a peer; fails (never hangs) if none comes or the peer failed."""
    if not conn.poll(timeout):
        raise AssertionError(f"no message from the peer within {timeout} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise AssertionError(f"the peer failed:\n{msg[1]}")
    return msg


def _entry(target, conn, args):
    """Run ``target(conn, *args)`` in a spawned process; report an exception to the parent."""
    try:
        target(conn, *args)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            sys.exit(1)


class Peer:
    """A spawned process running ``target(conn, *args)``, talking over a pipe."""

    def __init__(self, target, *args):
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_entry, args=(target, child, args), daemon=True)
        self.proc.start()
        child.close()

    def send(self, msg) -> None:
        self.conn.send(msg)

    def recv(self, timeout: float = LIMIT):
        return recv(self.conn, timeout)

    def finish(self, timeout: float = LIMIT) -> None:
        """Join and require exit code 0."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
            raise AssertionError(f"peer {self.proc.pid} did not exit within {timeout} s")
        assert self.proc.exitcode == 0, f"peer exited with {self.proc.exitcode}"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


@pytest.fixture
def spawn():
    """``spawn(target, *args) -> Peer``; every peer still alive at teardown is killed."""
    peers: list[Peer] = []

    def start(target, *args) -> Peer:
        peer = Peer(target, *args)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.kill()
        peer.conn.close()


@pytest.fixture
def events():
    """``events(flags) -> event``; destroys what the test did not."""
    made: list[hip.Event] = []

    def new(flags: int = hip.hipEventDefault) -> hip.Event:
        made.append(hip.hipEventCreateWithFlags(flags))
        return made[-1]

    yield new
    for ev in made:
        if not ev.destroyed:
            hip.hipEventDestroy(ev)


def hold(g) -> None:
    """A host function that blocks its stream until ``g`` (threading or mp Event) is set."""
    if not g.wait(LIMIT):
        raise TimeoutError("gate was never opened")


# -- in one process: CUDA's rules ------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [hip.hipEventDefault, hip.hipEventBlockingSync, hip.hipEventDisableTiming, IPC],
    ids=["default", "blocking", "no-timing", "interprocess"],
)
def test_a_never_recorded_event_is_complete(flags, events, stream):
    ev = events(flags)
    assert hip.hipEventQuery(ev) == E.hipSuccess
    assert type(hip.hipEventQuery(ev)) is E
    t0 = time.monotonic()
    hip.hipEventSynchronize(ev)
    hip.hipEventSynchronize(ev, timeout=0)
    s = stream()
    hip.hipStreamWaitEvent(s, ev, 0)  # imposes no wait
    hip.hipStreamSynchronize(s, timeout=5)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("flags", [hip.hipEventDefault, IPC], ids=["local", "interprocess"])
def test_query_and_synchronize_follow_a_record_behind_a_blocked_stream(flags, events, stream, gate):
    ev, s, g = events(flags), stream(), gate()
    ran = []
    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipLaunchHostFunc(s, ran.append, 1)
    hip.hipEventRecord(ev, s)
    assert hip.hipEventQuery(ev) == E.hipErrorNotReady
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventSynchronize(ev, timeout=0.15)
    assert code_of(exc) == E.hipErrorNotReady
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventSynchronize(ev, timeout=0)
    assert code_of(exc) == E.hipErrorNotReady
    assert hip.hipEventQuery(ev) == E.hipErrorNotReady and ran == []
    threading.Timer(0.1, g.set).start()
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    assert ran == [1], "synchronize returned before the recorded work ran"
    assert hip.hipEventQuery(ev) == E.hipSuccess
    # Recording on the null stream returns at once; the record completes in null-stream order.
    hip.hipEventRecord(ev)
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    assert hip.hipEventQuery(ev) == E.hipSuccess
    hip.hipEventRecord(ev, 0)
    hip.hipStreamSynchronize(0, timeout=LIMIT)
    hip.hipEventSynchronize(ev, timeout=0)


def test_synchronize_waits_for_the_newest_record_as_of_the_call_not_later_ones(
    events, stream, gate
):
    ev = events(hip.hipEventDisableTiming)
    s1, s2 = stream(), stream()
    g1, g2 = gate(), gate()
    hip.hipLaunchHostFunc(s1, hold, g1)
    hip.hipEventRecord(ev, s1)  # record 1
    calling, returned = threading.Event(), threading.Event()
    errors = []

    def waiter():
        calling.set()
        try:
            hip.hipEventSynchronize(ev, timeout=LIMIT)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        returned.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert calling.wait(5)
    time.sleep(0.1)
    hip.hipLaunchHostFunc(s2, hold, g2)
    hip.hipEventRecord(ev, s2)  # record 2, made after the call: not waited for
    assert not returned.is_set()
    g1.set()
    assert returned.wait(5), "synchronize waited for a record made after the call"
    t.join(5)
    assert errors == []
    assert hip.hipEventQuery(ev) == E.hipErrorNotReady  # the newest record is still pending
    g2.set()
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    assert hip.hipEventQuery(ev) == E.hipSuccess


@pytest.mark.parametrize("how", ["hipEventSynchronize", "hipStreamWaitEvent"])
def test_a_later_record_does_not_release_a_wait_for_an_earlier_one(how, events, stream, gate):
    """CUDA: the wait is for the work captured when it was issued; "subsequent calls [to
    cudaEventRecord] will not have any effect" on it (cudaStreamWaitEvent's documentation)."""
    ev = events(hip.hipEventDisableTiming)
    s1, g = stream(), gate()
    written = []
    hip.hipLaunchHostFunc(s1, hold, g)
    hip.hipLaunchHostFunc(s1, written.append, "record-1 work")
    hip.hipEventRecord(ev, s1)  # record 1, pending behind the gate
    seen: list[list[str]] = []
    done = threading.Event()
    if how == "hipEventSynchronize":
        calling = threading.Event()

        def waiter():
            calling.set()
            try:
                hip.hipEventSynchronize(ev, timeout=LIMIT)
            finally:
                seen.append(list(written))
                done.set()

        threading.Thread(target=waiter, daemon=True).start()
        assert calling.wait(5)
        time.sleep(0.05)
    else:
        s2 = stream()
        hip.hipStreamWaitEvent(s2, ev, 0)
        hip.hipLaunchHostFunc(s2, lambda: (seen.append(list(written)), done.set()))
    idle = stream()
    hip.hipEventRecord(ev, idle)  # record 2, on an idle stream: completes at once
    hip.hipStreamSynchronize(idle, timeout=LIMIT)
    time.sleep(0.3)
    released_early = done.is_set()
    g.set()
    assert done.wait(LIMIT)
    assert not released_early and seen == [["record-1 work"]], seen


def test_synchronize_timeout_must_be_a_non_negative_number(events):
    ev = events()
    for bad in (-0.5, "1", True, [1], object()):
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventSynchronize(ev, timeout=bad)
        assert code_of(exc) == E.hipErrorInvalidValue, bad
    hip.hipEventSynchronize(ev, timeout=0)
    hip.hipEventSynchronize(ev, timeout=1)


def test_many_records_after_one_long_pending_record_are_accepted(events, gate):
    ev = events(hip.hipEventDisableTiming)
    slow = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)  # the null stream won't wait
    g = gate()
    try:
        hip.hipLaunchHostFunc(slow, hold, g)
        hip.hipEventRecord(ev, slow)  # this one record stays pending
        for i in range(20000):
            hip.hipEventRecord(ev)  # on the null stream, which does not wait for `slow`
            if i % 1000 == 999:  # the null stream is asynchronous: keep it close behind
                hip.hipStreamSynchronize(None, timeout=LIMIT)
        hip.hipStreamSynchronize(None, timeout=LIMIT)
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        g.set()
        hip.hipStreamSynchronize(slow, timeout=LIMIT)
        hip.hipStreamDestroy(slow)


def test_more_pending_records_than_the_window_are_refused_cleanly(events, stream, gate):
    """The documented limit: WINDOW pending records of one event, plus STRAGGLERS behind."""
    from hipipc.backends.eventstate import STRAGGLERS, WINDOW

    ev, s, g = events(hip.hipEventDisableTiming), stream(), gate()
    hip.hipLaunchHostFunc(s, hold, g)
    for _ in range(WINDOW + STRAGGLERS):
        hip.hipEventRecord(ev, s)
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventRecord(ev, s)
    assert code_of(exc) == E.hipErrorLaunchOutOfResources
    assert hip.hipEventQuery(ev) == E.hipErrorNotReady
    g.set()
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    assert hip.hipEventQuery(ev) == E.hipSuccess
    hip.hipEventRecord(ev, s)  # usable again
    hip.hipStreamSynchronize(s, timeout=LIMIT)
    assert hip.hipEventQuery(ev) == E.hipSuccess


def test_record_on_a_destroyed_or_foreign_stream(events, stream):
    ev = events()
    s = stream()
    hip.hipStreamDestroy(s)
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventRecord(ev, s)
    assert code_of(exc) == E.hipErrorInvalidResourceHandle
    # The refused record took no sequence number: the event is still complete.
    assert hip.hipEventQuery(ev) == E.hipSuccess
    hip.hipEventSynchronize(ev, timeout=0)


# -- timing ----------------------------------------------------------------------------


def test_elapsed_time(events, stream, gate):
    start, stop = events(), events()
    s = stream()
    hip.hipEventRecord(start, s)
    hip.hipLaunchHostFunc(s, time.sleep, 0.1)
    hip.hipEventRecord(stop, s)
    hip.hipEventSynchronize(stop, timeout=LIMIT)
    ms = hip.hipEventElapsedTime(start, stop)
    assert isinstance(ms, float)
    assert 95.0 <= ms < 2000.0, ms
    assert hip.hipEventElapsedTime(start, start) == 0.0
    assert hip.hipEventElapsedTime(stop, start) == pytest.approx(-ms)
    # Pending: hipErrorNotReady.
    g = gate()
    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipEventRecord(stop, s)
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventElapsedTime(start, stop)
    assert code_of(exc) == E.hipErrorNotReady
    g.set()
    hip.hipEventSynchronize(stop, timeout=LIMIT)
    assert hip.hipEventElapsedTime(start, stop) >= ms


def test_elapsed_time_refuses_untimed_unrecorded_and_destroyed_events(events):
    timed, untimed, ipc, unrecorded = (
        events(),
        events(hip.hipEventDisableTiming),
        events(IPC),
        events(hip.hipEventBlockingSync),
    )
    for ev in (timed, untimed, ipc):
        hip.hipEventRecord(ev)
    hip.hipStreamSynchronize(None, timeout=LIMIT)  # the null stream is asynchronous
    for a, b in (
        (timed, untimed),
        (untimed, timed),
        (timed, ipc),
        (ipc, timed),
        (untimed, untimed),
        (timed, unrecorded),
        (unrecorded, timed),
    ):
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventElapsedTime(a, b)
        assert code_of(exc) == E.hipErrorInvalidResourceHandle, (a, b)
    for bad in (None, 0, "ev", object()):
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventElapsedTime(timed, bad)
        assert code_of(exc) == E.hipErrorInvalidValue
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventElapsedTime(bad, timed)
        assert code_of(exc) == E.hipErrorInvalidValue
    other = events()
    hip.hipEventRecord(other)
    hip.hipEventDestroy(other)
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventElapsedTime(timed, other)
    assert code_of(exc) == E.hipErrorInvalidResourceHandle


# -- flags, handles, destroy -----------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        0x8,
        0x10,
        0x100,
        1 << 31,
        -1,
        hip.hipEventInterprocess,
        hip.hipEventInterprocess | hip.hipEventBlockingSync,
        "2",
        2.0,
        True,
        None,
    ],
)
def test_bad_event_flags_are_invalid_value(flags):
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventCreateWithFlags(flags)
    assert code_of(exc) == E.hipErrorInvalidValue


@pytest.mark.parametrize("flags", [0, 1, 2, 3, IPC, IPC | hip.hipEventBlockingSync])
def test_good_event_flags(flags):
    ev = hip.hipEventCreateWithFlags(flags)
    try:
        assert ev.flags == flags
    finally:
        hip.hipEventDestroy(ev)
    assert store_entries() == [], "an unexported event must leave nothing in the store"


@pytest.mark.parametrize(
    "flags", [hip.hipEventDefault, hip.hipEventDisableTiming, hip.hipEventBlockingSync]
)
def test_handle_of_a_non_ipc_event_is_invalid_configuration(flags, events):
    """HIP's runtime returns hipErrorInvalidConfiguration (issue 11 §6; it was InvalidValue)."""
    ev = events(flags)
    with pytest.raises(hip.HipError) as exc:
        hip.hipIpcGetEventHandle(ev)
    assert code_of(exc) == E.hipErrorInvalidConfiguration
    for bad in (None, 0, b"x" * 64):
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcGetEventHandle(bad)
        assert code_of(exc) == E.hipErrorInvalidValue


def test_ipc_handle_is_stable_secret_and_refused_in_the_creating_process(events):
    ev = events(IPC)
    h = hip.hipIpcGetEventHandle(ev)
    assert isinstance(h, hip.IpcEventHandle) and len(bytes(h)) == 64
    assert hip.hipIpcGetEventHandle(ev) == h and bytes(hip.hipIpcGetEventHandle(ev)) == bytes(h)
    assert bytes(h)[8:24].hex() not in repr(h) and bytes(h)[8:24].hex() not in repr(ev)
    assert h.segment_name in store_entries()
    for form in (h, bytes(h), bytearray(bytes(h)), memoryview(bytes(h))):
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenEventHandle(form)
        assert code_of(exc) == E.hipErrorInvalidContext
    other = events(IPC)
    assert hip.hipIpcGetEventHandle(other) != h  # a fresh secret per event
    hip.hipEventDestroy(ev)
    hip.hipEventDestroy(other)
    assert h.segment_name not in store_entries()  # destroy revokes


def test_destroy_twice_and_every_use_after_destroy(events, stream):
    for flags in (hip.hipEventDefault, IPC):
        ev = events(flags)
        hip.hipEventDestroy(ev)
        s = stream()
        for call in (
            lambda e=ev: hip.hipEventDestroy(e),
            lambda e=ev: hip.hipEventRecord(e),
            lambda e=ev, s=s: hip.hipEventRecord(e, s),
            lambda e=ev: hip.hipEventQuery(e),
            lambda e=ev: hip.hipEventSynchronize(e, timeout=0),
            lambda e=ev, s=s: hip.hipStreamWaitEvent(s, e, 0),
            lambda e=ev: hip.hipIpcGetEventHandle(e),
        ):
            with pytest.raises(hip.HipError) as exc:
                call()
            assert code_of(exc) == E.hipErrorInvalidResourceHandle, flags
    for bad in (None, 0, "ev", object()):
        for call in (
            hip.hipEventDestroy,
            hip.hipEventQuery,
            hip.hipEventSynchronize,
            hip.hipEventRecord,
        ):
            with pytest.raises(hip.HipError) as exc:
                call(bad)
            assert code_of(exc) == E.hipErrorInvalidValue


def test_destroy_while_recorded_work_is_pending_still_completes_the_work(stream, gate):
    ev = hip.hipEventCreateWithFlags(IPC)
    hip.hipIpcGetEventHandle(ev)
    s, g = stream(), gate()
    ran = []
    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipEventRecord(ev, s)
    hip.hipLaunchHostFunc(s, ran.append, 1)
    hip.hipEventDestroy(ev)
    g.set()
    hip.hipStreamSynchronize(s, timeout=LIMIT)
    assert ran == [1]


def test_a_dropped_ipc_event_revokes_its_handle():
    ev = hip.hipEventCreateWithFlags(IPC)
    h = hip.hipIpcGetEventHandle(ev)
    assert h.segment_name in store_entries()
    del ev
    gc.collect()
    assert h.segment_name not in store_entries()
    with pytest.raises(hip.HipError) as exc:
        hip.hipIpcOpenEventHandle(h)
    assert code_of(exc) == E.hipErrorInvalidResourceHandle


def test_garbage_and_truncated_event_handles_are_refused_cleanly(events):
    rng = random.Random(3)
    live = bytes(hip.hipIpcGetEventHandle(events(IPC)))
    mem = hip.hipMalloc(4096)
    try:
        memh = hip.hipIpcGetMemHandle(mem)
        garbage = [
            b"",
            b"\x00",
            bytes(63),
            bytes(64),
            bytes(65),
            b"\xff" * 64,
            live[:63],
            live + b"\x00",
            live[1:],
            b"HIPC" + bytes(60),
            bytes(rng.getrandbits(8) for _ in range(64)),
            "x" * 64,
            None,
            7,
            3.5,
            [0] * 64,
            object(),
            memh,
            bytes(memh),
        ]
        garbage += [
            b"HIPC\x01\x03" + bytes(rng.getrandbits(8) for _ in range(58)) for _ in range(200)
        ]
        for bad in garbage:
            with pytest.raises(hip.HipError) as exc:
                hip.hipIpcOpenEventHandle(bad)
            assert code_of(exc) in REJECTED, (bad, exc.value)
        # and an event handle is not a memory handle
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenMemHandle(live)
        assert code_of(exc) in REJECTED
    finally:
        hip.hipFree(mem)


# -- across processes: children --------------------------------------------------------


def _owner(conn):
    """Create and export an IPC event; obey "destroy" and "exit"."""
    ev = hip.hipEventCreateWithFlags(IPC)
    conn.send(bytes(hip.hipIpcGetEventHandle(ev)))
    while True:
        cmd = recv(conn)
        if cmd == "destroy":
            hip.hipEventDestroy(ev)
            try:
                hip.hipIpcGetEventHandle(ev)
                code = None
            except hip.HipError as exc:
                code = int(exc.code)
            conn.send(("destroyed", code))
        elif cmd == "exit":
            break
    if not ev.destroyed:
        hip.hipEventDestroy(ev)
    conn.send("bye")


def _hold_then_sleep(g, seconds):
    time.sleep(seconds)
    hold(g)


def _stamp(ptr):
    """Write the completion time of the data into the first 8 bytes of the buffer."""
    hip.asarray(ptr, 1, np.int64)[0] = time.perf_counter_ns()


def _record_round(ev, ptr, g):
    """Sleep 0.3 s (then pass the gate), write FINAL, stamp, record: all on a stream."""
    s = hip.hipStreamCreate()
    hip.hipLaunchHostFunc(s, _hold_then_sleep, g, 0.3)
    hip.hipMemsetAsync(ptr + 8, FINAL, N - 8, s)
    hip.hipLaunchHostFunc(s, _stamp, ptr)
    hip.hipEventRecord(ev, s)
    return s, time.perf_counter_ns()


def _wait_round(ev, ptr, mode, g):
    """Wait as the consumer does and return what it saw."""
    out = {}
    if mode == "synchronize":
        g.set()
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        out["t_return"] = time.perf_counter_ns()
        data = hip.asarray(ptr, N).copy()
    else:
        s = hip.hipStreamCreate()
        data = np.zeros(N, np.uint8)
        t0 = time.perf_counter()
        hip.hipStreamWaitEvent(s, ev, 0)
        hip.hipMemcpyAsync(data, ptr, N, hip.hipMemcpyDeviceToHost, s)
        out["enqueue_s"] = time.perf_counter() - t0
        out["query"] = int(hip.hipStreamQuery(s))
        out["copied_early"] = bool(data.any())
        g.set()
        hip.hipStreamSynchronize(s, timeout=LIMIT)
        out["t_return"] = time.perf_counter_ns()
        hip.hipStreamDestroy(s)
    out["event_query"] = int(hip.hipEventQuery(ev))
    out["stamp"] = int(data[:8].view(np.int64)[0])
    out["values"] = sorted(int(v) for v in np.unique(data[8:]))
    return out


def _ordering_peer(conn, role, mode, g):
    """The exporter: allocates (STALE), creates the event, then records or waits."""
    ptr = hip.hipMalloc(N)
    hip.hipMemset(ptr, STALE, N)
    ev = hip.hipEventCreateWithFlags(IPC)
    conn.send((bytes(hip.hipIpcGetMemHandle(ptr)), bytes(hip.hipIpcGetEventHandle(ev))))
    if role == "recorder":
        assert recv(conn) == "go"
        s, t = _record_round(ev, ptr, g)
        conn.send(("recorded", t))
        assert recv(conn) == "done"
        hip.hipStreamSynchronize(s, timeout=LIMIT)
        hip.hipStreamDestroy(s)
    else:
        tag, _ = recv(conn)
        assert tag == "recorded"
        conn.send(("result", _wait_round(ev, ptr, mode, g)))
        assert recv(conn) == "done"
    hip.hipEventDestroy(ev)
    hip.hipFree(ptr)
    conn.send("bye")


def check_round(out, t_recorded, mode):
    assert out["values"] == [FINAL], f"the consumer saw {out['values']}, not only {FINAL:#x}"
    assert 0 < out["stamp"] <= out["t_return"], "returned before the producer's writes ended"
    assert out["t_return"] - t_recorded >= 0.2e9, "returned before the producer's 0.3 s sleep"
    assert out["t_return"] - out["stamp"] < 2e9, "woke too late"
    assert out["event_query"] == E.hipSuccess
    if mode == "stream-wait":
        assert out["enqueue_s"] < 0.2, "hipStreamWaitEvent/hipMemcpyAsync waited"
        assert out["query"] == E.hipErrorNotReady and not out["copied_early"]


@pytest.mark.parametrize("mode", ["synchronize", "stream-wait"])
@pytest.mark.parametrize("direction", ["exporter-records", "importer-records"])
def test_cross_process_ordering(direction, mode, spawn):
    g = SPAWN.Event()
    role = "recorder" if direction == "exporter-records" else "waiter"
    peer = spawn(_ordering_peer, role, mode, g)
    memh, evh = peer.recv()
    ptr = hip.hipIpcOpenMemHandle(memh)
    ev = hip.hipIpcOpenEventHandle(evh)
    s = None
    try:
        assert (hip.asarray(ptr, N)[8:] == STALE).all()
        if role == "recorder":  # the peer records, this process (an importer) waits
            peer.send("go")
            tag, t_recorded = peer.recv()
            assert tag == "recorded"
            out = _wait_round(ev, ptr, mode, g)
        else:  # this process (an importer) records, the exporter waits
            s, t_recorded = _record_round(ev, ptr, g)
            peer.send(("recorded", t_recorded))
            tag, out = peer.recv()
            assert tag == "result"
        check_round(out, t_recorded, mode)
    finally:
        g.set()
        if s is not None:
            hip.hipStreamSynchronize(s, timeout=LIMIT)
            hip.hipStreamDestroy(s)
        hip.hipEventDestroy(ev)
        hip.hipIpcCloseMemHandle(ptr)
    peer.send("done")
    assert peer.recv() == "bye"
    peer.finish()


def test_every_single_bit_flip_of_a_live_event_handle_is_refused(spawn):
    owner = spawn(_owner)
    live = owner.recv()
    assert len(live) == 64
    opened = []
    unexpected = []
    for bit in range(64 * 8):
        flipped = bytearray(live)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            opened.append((bit, hip.hipIpcOpenEventHandle(bytes(flipped))))
        except hip.HipError as exc:
            if exc.code not in REJECTED:
                unexpected.append((bit, exc.code.name))
        except Exception as exc:  # the point of the test: never another exception
            unexpected.append((bit, repr(exc)))
    for cut in (live[:63], live[:32], live[1:], live + b"\x00", live * 2):
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenEventHandle(cut)
        assert code_of(exc) == E.hipErrorInvalidValue
    for _, ev in opened:
        hip.hipEventDestroy(ev)
    assert not opened, f"flipped bits opened an event: {[b for b, _ in opened]}"
    assert not unexpected, unexpected
    # The unflipped handle does open here (so the refusals above are not for another reason).
    ev = hip.hipIpcOpenEventHandle(live)
    hip.hipEventRecord(ev)
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    assert hip.hipEventQuery(ev) == E.hipSuccess
    hip.hipEventDestroy(ev)
    owner.send("exit")
    assert owner.recv() == "bye"
    owner.finish()


def test_a_destroyed_event_is_revoked_but_earlier_opens_keep_working(spawn, stream, gate):
    owner = spawn(_owner)
    h = hip.IpcEventHandle(owner.recv())
    before = hip.hipIpcOpenEventHandle(h)
    extra = hip.hipIpcOpenEventHandle(h)
    try:
        # An opener's destroy revokes nothing.
        hip.hipEventDestroy(extra)
        hip.hipEventDestroy(hip.hipIpcOpenEventHandle(h))
        owner.send("destroy")
        tag, code = owner.recv()
        assert tag == "destroyed" and code == E.hipErrorInvalidResourceHandle
        with pytest.raises(hip.HipError) as exc:
            hip.hipIpcOpenEventHandle(h)
        assert code_of(exc) == E.hipErrorInvalidResourceHandle
        assert h.segment_name not in store_entries()
        # The event opened before the destroy still records, queries, waits.
        s, g = stream(), gate()
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipEventRecord(before, s)
        assert hip.hipEventQuery(before) == E.hipErrorNotReady
        s2 = stream()
        seen = []
        hip.hipStreamWaitEvent(s2, before, 0)
        hip.hipLaunchHostFunc(s2, seen.append, 1)
        g.set()
        hip.hipEventSynchronize(before, timeout=LIMIT)
        hip.hipStreamSynchronize(s2, timeout=LIMIT)
        assert hip.hipEventQuery(before) == E.hipSuccess and seen == [1]
    finally:
        hip.hipEventDestroy(before)
    owner.send("exit")
    assert owner.recv() == "bye"
    owner.finish()


# -- waiting costs no CPU, many waiters, dead recorders --------------------------------


def _cpu_waiter(conn):
    ev = hip.hipIpcOpenEventHandle(recv(conn))
    conn.send("opened")
    results = []
    for mode in ("synchronize", "stream-wait"):
        assert recv(conn)[0] == "recorded"
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if mode == "synchronize":
            hip.hipEventSynchronize(ev, timeout=LIMIT)
        else:
            s = hip.hipStreamCreate()
            hip.hipStreamWaitEvent(s, ev, 0)
            hip.hipStreamSynchronize(s, timeout=LIMIT)
            hip.hipStreamDestroy(s)
        results.append((mode, time.process_time() - cpu0, time.perf_counter() - wall0))
        conn.send("waited")
    conn.send(("result", results))
    hip.hipEventDestroy(ev)


def test_waiting_for_an_ipc_event_burns_no_cpu(spawn, events, stream):
    ev = events(IPC)
    peer = spawn(_cpu_waiter)
    peer.send(bytes(hip.hipIpcGetEventHandle(ev)))
    assert peer.recv() == "opened"
    s = stream()
    for _ in range(2):
        hip.hipLaunchHostFunc(s, time.sleep, 1.0)
        hip.hipEventRecord(ev, s)
        peer.send(("recorded",))
        assert peer.recv() == "waited"
    tag, results = peer.recv()
    peer.finish()
    for mode, cpu, wall in results:
        assert wall >= 0.5, (mode, wall)
        assert cpu < 0.1, f"{mode}: {cpu:.3f} s of CPU while waiting {wall:.2f} s"


def _many_waiter(conn, mode):
    ev = hip.hipIpcOpenEventHandle(recv(conn))
    conn.send("opened")
    assert recv(conn) == "recorded"
    conn.send("waiting")
    cpu0 = time.process_time()
    if mode == "synchronize":
        hip.hipEventSynchronize(ev, timeout=LIMIT)
    else:
        s = hip.hipStreamCreate()
        hip.hipStreamWaitEvent(s, ev, 0)
        hip.hipStreamSynchronize(s, timeout=LIMIT)
        hip.hipStreamDestroy(s)
    t = time.perf_counter_ns()
    conn.send(("woke", t, time.process_time() - cpu0))
    hip.hipEventDestroy(ev)


def test_many_processes_waiting_on_one_event_all_wake(spawn, events, stream, gate):
    ev = events(IPC)
    h = bytes(hip.hipIpcGetEventHandle(ev))
    peers = [spawn(_many_waiter, "synchronize" if i % 2 else "stream-wait") for i in range(6)]
    for p in peers:
        p.send(h)
    for p in peers:
        assert p.recv() == "opened"
    s, g = stream(), gate()
    completed = []
    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipLaunchHostFunc(s, lambda: completed.append(time.perf_counter_ns()))
    hip.hipEventRecord(ev, s)  # one record for all of them
    for p in peers:
        p.send("recorded")
    for p in peers:
        assert p.recv() == "waiting"
    time.sleep(0.3)
    assert all(not p.conn.poll() for p in peers), "a waiter returned before the record completed"
    t_release = time.perf_counter_ns()
    g.set()
    woke = [p.recv() for p in peers]
    for p in peers:
        p.finish()
    assert all(w[0] == "woke" for w in woke)
    assert all(w[1] >= t_release for w in woke)
    latest = max(w[1] for w in woke) - completed[0]
    assert latest < 1e9, f"the last waiter woke {latest / 1e6:.0f} ms after completion"
    assert all(w[2] < 0.3 for w in woke), [w[2] for w in woke]


def _dying_exporter(conn):
    ev = hip.hipEventCreateWithFlags(IPC)
    conn.send(bytes(hip.hipIpcGetEventHandle(ev)))
    assert recv(conn) == "record"
    s = hip.hipStreamCreate()
    hip.hipLaunchHostFunc(s, time.sleep, 60)  # never finishes: it is SIGKILLed first
    hip.hipEventRecord(ev, s)
    conn.send("recorded")
    time.sleep(LIMIT)
    raise AssertionError("was not killed")


def _orphaned_waiter(conn):
    ev = hip.hipIpcOpenEventHandle(recv(conn))
    conn.send("opened")
    assert recv(conn) == "wait"
    out = {"query_before": int(hip.hipEventQuery(ev))}
    conn.send(("waiting", time.perf_counter_ns()))
    try:
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        out["code"] = "returned"
    except hip.HipError as exc:
        out["code"] = exc.code.name
    out["t_raise"] = time.perf_counter_ns()
    try:
        hip.hipEventQuery(ev)
        out["query_after"] = "returned"
    except hip.HipError as exc:
        out["query_after"] = exc.code.name
    # A stream that waits on it reports the failure, and its later work still runs.
    s = hip.hipStreamCreate()
    ran = []
    hip.hipStreamWaitEvent(s, ev, 0)
    hip.hipLaunchHostFunc(s, ran.append, 1)
    t0 = time.perf_counter()
    try:
        hip.hipStreamSynchronize(s, timeout=LIMIT)
        out["stream"] = "returned"
    except hip.HipError as exc:
        out["stream"] = exc.code.name
    out["stream_s"] = time.perf_counter() - t0
    out["stream_ran"] = ran
    hip.hipStreamDestroy(s)
    hip.hipEventDestroy(ev)
    conn.send(("result", out))


def test_exporter_death_while_an_importer_waits(spawn):
    exporter = spawn(_dying_exporter)
    waiter = spawn(_orphaned_waiter)
    raw = exporter.recv()
    name = hip.IpcEventHandle(raw).segment_name
    waiter.send(raw)
    assert waiter.recv() == "opened"
    exporter.send("record")
    assert exporter.recv() == "recorded"
    waiter.send("wait")
    tag, t_waiting = waiter.recv()
    assert tag == "waiting"
    time.sleep(0.3)
    assert not waiter.conn.poll(), "the wait ended while the exporter was alive"
    t_kill = time.perf_counter_ns()
    os.kill(exporter.proc.pid, signal.SIGKILL)
    exporter.proc.join(LIMIT)  # reap it
    assert exporter.proc.exitcode == -signal.SIGKILL
    tag, out = waiter.recv()
    waiter.finish()
    assert out["query_before"] == E.hipErrorNotReady
    assert out["code"] == "hipErrorLaunchFailure", out
    assert t_kill < out["t_raise"] < t_kill + 2e9, (out["t_raise"] - t_kill) / 1e9
    assert out["query_after"] == "hipErrorLaunchFailure"
    assert out["stream"] == "hipErrorLaunchFailure" and out["stream_s"] < 2.0
    assert out["stream_ran"] == [1]
    # The dead exporter's segment stays until collected; `hipipc gc` removes it.
    assert name in store_entries()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "hipipc", "gc"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert name not in store_entries()


def test_exporter_death_is_detected_before_the_parent_reaps_it(spawn):
    """The waiter is the dead exporter's parent and has not reaped it: a zombie is dead."""
    exporter = spawn(_dying_exporter)
    raw = exporter.recv()
    ev = hip.hipIpcOpenEventHandle(raw)
    try:
        exporter.send("record")
        assert exporter.recv() == "recorded"
        os.kill(exporter.proc.pid, signal.SIGKILL)  # not joined: a zombie until reaped
        time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventSynchronize(ev, timeout=2.5)
        assert code_of(exc) == E.hipErrorLaunchFailure
        assert time.monotonic() - t0 < 2.0
    finally:
        hip.hipEventDestroy(ev)
        exporter.kill()
        subprocess.run([sys.executable, "-m", "hipipc", "gc"], capture_output=True, timeout=60)
        assert hip.IpcEventHandle(raw).segment_name not in store_entries()


def _die_holding_the_lock(conn):
    ev = hip.hipIpcOpenEventHandle(recv(conn))
    # Fault injection: stop dead in the middle of an update of the shared state.
    ev._state._lock()
    conn.send("locked")
    os._exit(0)


def test_a_process_that_dies_inside_the_event_lock_does_not_wedge_the_others(
    spawn, events, stream, gate
):
    ev = events(IPC)
    peer = spawn(_die_holding_the_lock)
    peer.send(bytes(hip.hipIpcGetEventHandle(ev)))
    assert peer.recv() == "locked"
    peer.finish()
    s, g = stream(), gate()
    steps = []

    def use():
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipEventRecord(ev, s)  # takes the lock the dead process held
        steps.append(int(hip.hipEventQuery(ev)))
        g.set()
        hip.hipEventSynchronize(ev, timeout=5)
        hip.hipEventRecord(ev)  # on the (asynchronous) null stream
        hip.hipEventSynchronize(ev, timeout=5)
        steps.append(int(hip.hipEventQuery(ev)))

    t = threading.Thread(target=use, daemon=True)  # a wedged lock must not hang pytest
    t.start()
    t.join(10)
    g.set()
    assert not t.is_alive(), "the event's lock stayed held by a dead process"
    assert steps == [E.hipErrorNotReady, E.hipSuccess]


def _foreign_open(raw: bytes, uid: int) -> list:
    """In a forked child: become ``uid`` (no groups), open the event, record it."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        ev = hip.hipIpcOpenEventHandle(raw)
    except hip.HipError as exc:
        return [exc.code.name, exc.detail]
    hip.hipEventRecord(ev)
    hip.hipEventDestroy(ev)
    return ["ok", ""]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a child to another uid needs root")
def test_a_foreign_uid_cannot_open_an_event_even_with_sharing_on(events, monkeypatch):
    """Events never leave the exporter's uid: their page holds a process-shared lock that a
    writer could corrupt.  HIPIPC_SHARE opens memory to others, not events."""
    from _proc import in_fork  # the team's bounded fork helper (a uid switch needs a fork)

    monkeypatch.setenv("HIPIPC_SHARE", "all")
    ev = events(IPC)
    raw = bytes(hip.hipIpcGetEventHandle(ev))
    store = os.environ["HIPIPC_STORE"].replace("{uid}", str(os.geteuid()))
    name = hip.IpcEventHandle(raw).segment_name
    assert stat.S_IMODE(os.stat(os.path.join(store, name)).st_mode) == 0o600
    got = in_fork(_foreign_open, raw, 65534)
    assert got[0] == "hipErrorInvalidHandle" and "one user" in got[1], got
    assert hip.hipEventQuery(ev) == E.hipSuccess
