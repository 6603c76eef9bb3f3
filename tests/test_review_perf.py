"""Adversarial review of issue 15's fast paths (open-path and event-wake).

(a) ``asarray`` now hands numpy an :class:`~hipipc.mapping.ArrayView` (the array interface)
instead of a ctypes buffer, and ``asarray``/open/close validate their inputs inline: views must
still keep the mapping alive through every way an array can outlive its pointer (a crash would
be the worst bug, so those run in a fresh interpreter), and every bad input must still give
the code and message it gave before.
(b) An IPC event's waiter returns straight after a wake-up when its record's done slot holds
its number: a wake-up must never be lost (many waiters, threads and processes, records past the
window of 4096), and a hostile peer scribbling the page while a record is pending must never
make a waiter return before the completion, nor make one crash or wait without end.

Every cross-process wait is bounded (readline with a timeout, ``timeout=`` on every wait).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from _proc import child_env, readline, run_python

import hipipc as hip
from hipipc.backends import eventstate as es

E = hip.hipError_t
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
LIMIT = 30.0  # per wait and per answer of a peer: generous, the machine is loaded


# -- (a) views over the array interface ------------------------------------------------------

_VIEWS = r"""
import gc, json, os, pickle, sys, threading
import numpy as np
import hipipc as hip
h = bytes.fromhex(sys.argv[1])
out = {}
def opened():
    return hip.hipIpcOpenMemHandle(h)
# a view of a view (slice, transpose, dtype view) outlives close
p = opened(); a = hip.asarray(p, (256, 64), np.int32); v = a[1:, ::2].T; w = a[1:].view(np.uint8)
del a; hip.hipIpcCloseMemHandle(p); gc.collect()
w[0, 0] = 5; out["view_of_view"] = int(v[0, 0]) & 0xFF
del v, w; gc.collect()
# the array's base, wrapped again after close
p = opened(); a = hip.asarray(p, 16, np.uint8); base = a.base; del a
hip.hipIpcCloseMemHandle(p); gc.collect()
b = np.asarray(base); b[0] = 1; out["base_again"] = int(b[0]); del b, base; gc.collect()
# DLPack and memoryview exports outlive close
p = opened(); a = hip.asarray(p, 16, np.float32); d = np.from_dlpack(a); del a
hip.hipIpcCloseMemHandle(p); gc.collect(); d[0] = 2.0; out["dlpack"] = float(d[0])
del d; gc.collect()
p = opened(); a = hip.asarray(p, 16, np.uint8); m = memoryview(a); del a
hip.hipIpcCloseMemHandle(p); gc.collect(); m[0] = 3; out["memoryview"] = m[0]; del m; gc.collect()
# hipDeviceReset closes the import; the view keeps the pages, and it is no longer sendable
p = opened(); a = hip.asarray(p, 1 << 14, np.uint32); hip.hipDeviceReset(); gc.collect()
a[:] = 7; out["after_reset"] = int(a[-1])
try:
    pickle.dumps(a); out["pickle_after_reset"] = "sent"
except hip.HipError as exc:
    out["pickle_after_reset"] = exc.code.name
del a; gc.collect()
# this process's own allocation: freed, and freed again by a reset, under a live view
q = hip.hipMalloc(1 << 16); a = hip.asarray(q + 4096, (16, 16), np.float32); hip.hipFree(q)
r = hip.hipMalloc(1 << 16); b = hip.asarray(r, 1 << 14, np.float32); hip.hipDeviceReset()
gc.collect(); a[:] = 1.5; b[:] = 2.5; out["own"] = [float(a.sum()), float(b[-1])]
del a, b; gc.collect()
# a pickle round trip in the same process, used after the pointer is closed
p = opened(); a = hip.asarray(p, 8, np.uint8)
b = pickle.loads(pickle.dumps(a)); hip.hipIpcCloseMemHandle(p); del a; gc.collect()
b[0] = 9; out["pickled_after_close"] = int(b[0]); del b; gc.collect()
# a forked child writes through a view whose pointer its parent closed before the fork
p = opened(); a = hip.asarray(p, 64, np.uint8); hip.hipIpcCloseMemHandle(p)
pid = os.fork()
if pid == 0:
    try:
        a[5] = 77
        os._exit(0 if a[5] == 77 else 3)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0); out["fork"] = os.waitstatus_to_exitcode(status)
del a; gc.collect()
# asarray racing close: a view or hipErrorInvalidValue, never a view of unmapped pages
seen = set()
for _ in range(200):
    p = opened()
    def make():
        try:
            x = hip.asarray(p, 1 << 16, np.uint8); x[-1] = 1; seen.add(int(x[-1]))
        except hip.HipError as exc:
            seen.add(exc.code.name)
    t = threading.Thread(target=make); t.start(); hip.hipIpcCloseMemHandle(p); t.join(30)
gc.collect()
out["race"] = sorted(map(str, seen))
# zero-size, 0-d, offset, strides, byte order, writability
p = opened()
z, s, e = (hip.asarray(p, (0,), np.float64), hip.asarray(p, (), np.float64),
           hip.asarray(p, (0, 3), ">i2"))
a = hip.asarray(p + 8, (3, 4), np.uint16)
out["shapes"] = [list(z.shape), list(s.shape), list(e.shape), e.dtype.str]
out["layout"] = [a.__array_interface__["data"][0] - p, list(a.strides), a.flags.writeable,
                 a.flags.c_contiguous, a.flags.aligned]
del z, s, e, a; gc.collect(); hip.hipIpcCloseMemHandle(p)
print(json.dumps(out))
"""


def test_views_keep_the_mapping_through_every_way_an_array_outlives_its_pointer():
    src = hip.hipMalloc(1 << 16)
    try:
        hip.hipMemset(src, 0, 1 << 16)
        proc = run_python(_VIEWS, bytes(hip.hipIpcGetMemHandle(src)).hex(), timeout=120)
        out, err = proc.stdout.decode(), proc.stderr.decode()
        assert proc.returncode == 0, f"child exited {proc.returncode} (a crash?)\n{out}\n{err}"
        got = json.loads(out.strip().splitlines()[-1])
    finally:
        hip.hipFree(src)
    assert got["view_of_view"] == 5 and got["base_again"] == 1
    assert got["dlpack"] == 2.0 and got["memoryview"] == 3
    assert got["after_reset"] == 7 and got["pickle_after_reset"] == "hipErrorInvalidValue"
    assert got["pickled_after_close"] == 9 and got["fork"] == 0
    assert got["own"] == [384.0, 2.5]
    assert set(got["race"]) <= {"1", "hipErrorInvalidValue"}, got["race"]
    assert got["shapes"] == [[0], [], [0, 3], ">i2"]
    assert got["layout"] == [8, [8, 2], True, True, True]


@pytest.fixture
def ptr():
    p = hip.hipMalloc(4096)
    yield p
    hip.hipFree(p)


@pytest.mark.parametrize(
    "shape, message",
    [
        # A negative dimension is named first, wherever it stands (as before issue 15).
        ((1 << 63, -1), "asarray: negative dimension in (9223372036854775808, -1)"),
        ((-1, 1 << 63), "asarray: negative dimension in (-1, 9223372036854775808)"),
        ((1 << 64,), "asarray: a dimension of (18446744073709551616,) exceeds"),
        ((True,), "asarray: each dimension of shape must be an integer, not bool"),
        (4.0, "asarray: each dimension of shape must be an integer, not float"),
        (None, "asarray: each dimension of shape must be an integer, not NoneType"),
    ],
)
def test_asarray_refuses_bad_shapes_with_the_same_message_as_before(ptr, shape, message):
    with pytest.raises(hip.HipError) as err:
        hip.asarray(ptr, shape)
    assert err.value.code == E.hipErrorInvalidValue
    assert message in str(err.value)


def test_asarray_takes_a_0d_integer_array_as_a_shape_and_refuses_others_with_hiperror(ptr):
    # numpy's own rule (np.empty(np.array(4))); a TypeError escaped before.
    assert hip.asarray(ptr, np.array(4)).shape == (4,)
    assert hip.asarray(ptr, np.array([2, 2])).shape == (2, 2)
    for bad in (np.array(4.0), np.array("4"), np.array(None)):
        with pytest.raises(hip.HipError) as err:
            hip.asarray(ptr, bad)
        assert err.value.code == E.hipErrorInvalidValue
        assert "each dimension of shape must be an integer" in str(err.value)


def test_asarray_open_and_close_refuse_bad_inputs_as_before(ptr):
    handle = hip.hipIpcGetMemHandle(ptr)
    cases = [
        (lambda: hip.asarray(True, 4), "asarray needs an int pointer, not bool"),
        (lambda: hip.asarray(1.0, 4), "asarray needs an int pointer, not float"),
        (lambda: hip.asarray(ptr, 4, object), "holds Python objects"),
        (lambda: hip.asarray(ptr, 4, "nope"), "asarray: dtype must be a numpy dtype"),
        (lambda: hip.hipIpcOpenMemHandle(handle, True), "flags must be an integer, not bool"),
        (lambda: hip.hipIpcOpenMemHandle(handle, 0), "must be hipIpcMemLazyEnablePeerAccess"),
        (lambda: hip.hipIpcOpenMemHandle(b"x" * 10), "an IPC handle is 64 bytes, got 10"),
        (lambda: hip.hipIpcOpenMemHandle("x" * 64), "needs a 64-byte bytes-like object"),
        (lambda: hip.hipIpcCloseMemHandle(True), "needs an int pointer, not bool"),
        (lambda: hip.hipIpcCloseMemHandle(1 << 80), "is not a pointer hipIpcOpenMemHandle"),
        (lambda: hip.hipIpcCloseMemHandle(np.int64(ptr)), "this process allocated it"),
    ]
    for call, message in cases:
        with pytest.raises(hip.HipError) as err:
            call()
        assert err.value.code == E.hipErrorInvalidValue, message
        assert message in str(err.value)
    assert hip.asarray(np.int64(ptr), np.int32(4)).shape == (4,)


# -- (b) event wake-ups ----------------------------------------------------------------------

_WAITER = r"""
import json, sys, threading, time
import hipipc as hip
from hipipc.backends import eventstate as es
# 1000 s (default): a lost wake-up sleeps until the timeout instead of the next slice
es.LIVENESS_INTERVAL = float(sys.argv[3]) if len(sys.argv) > 3 else 1000.0
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
threads = int(sys.argv[2])
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    timeout = float(line)
    outs = []
    started = threading.Barrier(threads + 1)
    def wait():
        started.wait(60)
        t0 = time.monotonic()
        try:
            hip.hipEventSynchronize(ev, timeout=timeout)
            outs.append(["ok", time.monotonic() - t0, time.monotonic()])
        except hip.HipError as exc:
            outs.append([exc.code.name, time.monotonic() - t0, time.monotonic()])
        except BaseException as exc:
            outs.append(["EXC " + repr(exc), 0, 0])
    ts = [threading.Thread(target=wait) for _ in range(threads)]
    for t in ts:
        t.start()
    started.wait(60)
    print(json.dumps("waiting"), flush=True)
    for t in ts:
        t.join(timeout + 30)
    print(json.dumps(outs if len(outs) == threads else outs + [["hung", 0, 0]]), flush=True)
hip.hipEventDestroy(ev)
"""


class _Waiters:
    """A spawned interpreter whose threads each wait once per command (timeout in seconds)."""

    def __init__(self, raw: bytes, threads: int, liveness: float = 1000.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WAITER, raw.hex(), str(threads), str(liveness)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert self._answer() == "ready"

    def _answer(self):
        line = readline(self.proc.stdout, 2 * LIMIT + 30, "waiters")
        assert line, f"waiters died: exit {self.proc.wait(LIMIT)}"
        return json.loads(line)

    def start(self, timeout: float) -> None:
        self.proc.stdin.write(f"{timeout}\n".encode())
        self.proc.stdin.flush()
        assert self._answer() == "waiting"

    def results(self):
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(LIMIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(LIMIT)
        self.proc.stdout.close()


def _timed_wait(ev, out: list[float]) -> None:
    t0 = time.monotonic()
    hip.hipEventSynchronize(ev, timeout=LIMIT)
    out += [time.monotonic() - t0, time.monotonic()]


def _lockstep(ev, stream, groups: list[_Waiters], cycles: int, seed: int) -> None:
    """``cycles`` records, each awaited by every waiter of ``groups`` and a thread here,
    the completion landing before, while or after they go to sleep; each wait must end well
    before its timeout (a lost wake-up sleeps until it, then finds the record done), and a
    wait for a record held back must end after its release (CLOCK_MONOTONIC is one clock for
    every process), never before."""
    rng = random.Random(seed)
    for cycle in range(cycles):
        gate = threading.Event()
        hip.hipLaunchHostFunc(stream, gate.wait, LIMIT)
        pause = rng.choice([0.0, 0.0, 0.00005, 0.0003])
        if pause:
            hip.hipLaunchHostFunc(stream, time.sleep, pause)
        hip.hipEventRecord(ev, stream)
        if cycle % 3 == 0:
            gate.set()  # completes as the waiters start: before, during or after
        for g in groups:
            g.start(LIMIT)
        local: list[float] = []
        mine = threading.Thread(target=_timed_wait, args=(ev, local))
        mine.start()
        released = 0.0 if gate.is_set() else time.monotonic()
        gate.set()
        for g in groups:
            outs = g.results()
            assert all(o[0] == "ok" and o[1] < LIMIT / 2 for o in outs), (cycle, outs)
            assert all(o[2] >= released for o in outs), ("returned early", cycle, outs)
        mine.join(LIMIT + 10)
        assert len(local) == 2 and local[0] < LIMIT / 2, (cycle, local)
        assert local[1] >= released, ("returned early", cycle, local)
    assert hip.hipEventQuery(ev) == hip.hipSuccess


@pytest.mark.parametrize("start", ["window", "u32"])
def test_many_waiters_in_many_processes_lose_no_wakeup(monkeypatch, start):
    """Three processes of three waiter threads each, plus a thread here, all wait for one
    record at a time.  The records run past the window of 4096 slots (every slot reused), or
    past 2**32 (the numbers wrap to 0, which is also the never-recorded number: the page is
    set as 2**32 - 60 records would have left it, the newest completion in every slot).  The
    waiters' liveness slice is longer than their timeout, so a lost wake-up sleeps until the
    timeout (where the wait finds the record done and *succeeds*: only its duration tells)."""
    monkeypatch.setattr(es, "LIVENESS_INTERVAL", 1000.0)
    ev = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    groups: list[_Waiters] = []
    try:
        raw = bytes(hip.hipIpcGetEventHandle(ev))
        if start == "u32":
            state, newest = ev._state, (1 << 32) - 60
            for k in range(es.WINDOW):
                state._done[k] = newest - (newest - k) % es.WINDOW
            state._floor.value = state._recorded.value = newest
        groups = [_Waiters(raw, 3) for _ in range(3)]
        if start == "window":
            for _ in range(es.WINDOW - 60):  # the lockstep below crosses the window's end
                hip.hipEventRecord(ev, stream)
            hip.hipStreamSynchronize(stream, timeout=LIMIT)
        _lockstep(ev, stream, groups, 150, 15)
        if start == "u32":
            assert ev._state.target()[0] == 90  # wrapped
    finally:
        for g in groups:
            g.close()
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)


_SCRIBBLER = r"""
import ctypes, json, random, sys, time
import hipipc as hip
from hipipc.backends import eventstate as es
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
seq, seconds, full = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "full"
state = ev._state
base = state.addr
rng = random.Random(seq)
page = (ctypes.c_uint8 * es.STATE_SIZE).from_address(base)
snapshot = bytes(page)
mine = es._DONE + 4 * (seq % es.WINDOW)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    n += 1
    if full:  # anything anywhere, torn
        off = rng.randrange(es.STATE_SIZE)
        page[off] = rng.randrange(256)
    else:  # what cannot forge the record's completion: the futex word, the seqlock word,
        # other slots; byte by byte (torn), never the value seq
        off = rng.choice([64, 132, es._DONE + 4 * rng.randrange(es.WINDOW)])
        if off == mine:
            continue
        value = rng.randrange(1 << 32)
        if value == seq:
            continue
        for i in range(4):
            page[off + i] = (value >> (8 * i)) & 0xFF
    if n % 8 == 0:
        es._futex_wake_all(state._futex)
if not full:
    ctypes.memmove(base, snapshot, es.STATE_SIZE)  # an honest page again
es._futex_wake_all(state._futex)
print(json.dumps(n), flush=True)
"""


def _scribble(raw: bytes, seq: int, seconds: float, full: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIBBLER, raw.hex(), str(seq), str(seconds), str(full).lower()],
        stdout=subprocess.PIPE,
        env=child_env(),
    )


def _finish(proc: subprocess.Popen) -> int:
    line = readline(proc.stdout, LIMIT, "scribbler")
    assert proc.wait(LIMIT) == 0
    proc.stdout.close()
    return json.loads(line)


def test_a_scribbled_page_never_releases_a_waiter_before_the_completion(monkeypatch):
    """While a record is pending, a peer writes torn values into the futex word, the seqlock
    word and every other slot, and wakes the waiters again and again: no waiter returns.
    Once the page is honest again the completion releases every waiter, none lost."""
    monkeypatch.setattr(es, "LIVENESS_INTERVAL", 1000.0)
    ev = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    gate = threading.Event()
    group = None
    try:
        raw = bytes(hip.hipIpcGetEventHandle(ev))
        for _ in range(5000):  # past the window: every slot holds an old number
            hip.hipEventRecord(ev, stream)
        hip.hipLaunchHostFunc(stream, gate.wait, 2 * LIMIT)
        hip.hipEventRecord(ev, stream)
        seq = ev._state.target()[0]
        group = _Waiters(raw, 4)
        group.start(2 * LIMIT)
        local: list[object] = []
        mine = threading.Thread(
            target=lambda: local.append(hip.hipEventSynchronize(ev, timeout=2 * LIMIT))
        )
        mine.start()
        assert _finish(_scribble(raw, seq, 1.5, full=False)) > 100
        time.sleep(0.2)
        assert mine.is_alive() and not local, local  # nothing returned early here...
        gate.set()
        outs = group.results()  # ... nor there (a return before the gate shows as "ok" too,
        # so the waiters' durations must cover the scribbling)
        assert all(o[0] == "ok" and o[1] >= 1.5 for o in outs), outs
        mine.join(LIMIT)
        assert local == [None]
    finally:
        gate.set()
        if group is not None:
            group.close()
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)


def test_waiters_on_a_page_scribbled_at_random_end_with_hiperror_or_success_in_time():
    """Random torn bytes anywhere in the page while waiters wait (bounded) and records are
    made: every wait ends, in time, with success or a HipError; nobody crashes."""
    ev = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    gate = threading.Event()
    group = None
    try:
        raw = bytes(hip.hipIpcGetEventHandle(ev))
        hip.hipLaunchHostFunc(stream, gate.wait, LIMIT)
        hip.hipEventRecord(ev, stream)
        seq = ev._state.target()[0]
        group = _Waiters(raw, 4)
        group.start(3.0)
        scribbler = _scribble(raw, seq, 1.0, full=True)
        time.sleep(0.3)
        gate.set()
        outs = group.results()
        _finish(scribbler)
        allowed = {
            "ok",
            "hipErrorNotReady",
            "hipErrorLaunchFailure",
            E.hipErrorInvalidResourceHandle.name,
        }
        assert all(o[0] in allowed and o[1] < 15 for o in outs), outs
        assert group.proc.poll() is None  # alive
    finally:
        gate.set()
        if group is not None:
            group.close()
        try:
            hip.hipStreamSynchronize(stream, timeout=LIMIT)
        except hip.HipError:
            pass  # the page is garbage: its completion may report that
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)


_HOLDER = r"""
import sys
import hipipc as hip
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
ev._state._lock()
print("held", flush=True)
sys.stdin.read()  # until closed (or killed)
"""


def test_waiters_asleep_on_a_completion_that_cannot_take_the_lock_fail_within_the_bound(
    monkeypatch,
):
    """A record far behind the newest completes under the event's lock; a stopped peer holds
    it.  The completion gives up after LOCK_TIMEOUT and marks the page corrupt: the waiters
    already asleep on that record (another process, default liveness slice) fail with
    hipErrorInvalidResourceHandle soon after, not at their own timeout."""
    import signal

    monkeypatch.setattr(es, "LOCK_TIMEOUT", 1.0)
    ev = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    gate = threading.Event()
    group = holder = None
    try:
        raw = bytes(hip.hipIpcGetEventHandle(ev))
        hip.hipLaunchHostFunc(stream, gate.wait, LIMIT)
        hip.hipEventRecord(ev, stream)
        group = _Waiters(raw, 3, liveness=es.LIVENESS_INTERVAL)
        group.start(LIMIT)  # they wait for the gated record...
        time.sleep(1.0)  # ... once their threads, past the barrier, have called the wait
        for _ in range(es._LOCKLESS_SPAN):  # now too far behind to complete without the lock
            hip.hipEventRecord(ev, None)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, raw.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert readline(holder.stdout, LIMIT, "holder").strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        gate.set()
        with pytest.raises(hip.HipError) as failed:
            hip.hipStreamSynchronize(stream, timeout=LIMIT)
        assert failed.value.code == E.hipErrorLaunchFailure
        outs = group.results()
        invalid = E.hipErrorInvalidResourceHandle.name
        assert all(o[0] == invalid and o[1] < LIMIT / 2 for o in outs), outs
    finally:
        gate.set()
        if holder is not None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(LIMIT)
            holder.stdin.close()
            holder.stdout.close()
        if group is not None:
            group.close()
        try:
            hip.hipStreamSynchronize(stream, timeout=LIMIT)
        except hip.HipError:
            pass  # reported above
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)


def test_elapsed_time_never_reads_a_completion_time_not_yet_stored():
    """A timing event's completion time is stored before its done slot: a query that sees the
    record done (the slot) must find its time too.  Stored the other way round, a thread
    switch between the two stores (forced often here) let hipEventElapsedTime read the
    previous record's time: a negative interval between two records of one stream."""
    old = sys.getswitchinterval()
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    start, end = hip.hipEventCreate(), hip.hipEventCreate()
    negative = rounds = 0
    try:
        sys.setswitchinterval(1e-6)
        stop = time.monotonic() + 4.0
        while time.monotonic() < stop:
            rounds += 1
            hip.hipEventRecord(start, stream)
            hip.hipEventRecord(end, stream)
            while hip.hipEventQuery(end) != hip.hipSuccess:
                pass
            if hip.hipEventElapsedTime(start, end) < 0:
                negative += 1
    finally:
        sys.setswitchinterval(old)
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(start)
        hip.hipEventDestroy(end)
    assert negative == 0, f"{negative} negative intervals in {rounds} rounds"
