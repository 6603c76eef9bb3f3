"""An IPC event's page written by a hostile or buggy peer of the same user.

The page is shared memory every opener maps read-write.  Whatever bytes a peer writes into it,
records, queries, synchronizes and stream waits in the other processes give a ``HipError`` or
work, and return within a bound: no abort, no other exception type, no wait without end.  The
event's lock lives outside the page (an OFD lock, eventstate's module doc): a holder that is
killed releases it, one that is stopped makes records fail within ``LOCK_TIMEOUT``, and a fork
child never inherits it.  Every probe runs in a spawned peer whose answers are read with a
timeout, so a hang or a crash fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _proc import child_env, in_fork, readline

import hipipc as hip
from hipipc.backends import eventstate as es

E = hip.hipError_t
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
LIMIT = 30.0  # per answer of a peer; generous: the machine is loaded
QUICK = 5.0  # "at once": far below LIMIT and any wait bound, with room for a loaded machine
# What a peer's call may give on a hostile page: success or one of these codes.
INVALID = E.hipErrorInvalidResourceHandle.name  # an alias: the enum names it InvalidHandle
ALLOWED = {
    "ok",
    INVALID,
    "hipErrorLaunchFailure",
    "hipErrorLaunchOutOfResources",
    "hipErrorNotReady",
}

_PEER = r"""
import ctypes, json, os, random, sys, threading, time
import hipipc as hip
from hipipc.backends import eventstate as es
from hipipc.store import own_process

ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
state = ev._state
base = state.addr
stream, other = hip.hipStreamCreate(), hip.hipStreamCreate()
gated = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)  # the null stream ignores it
gate = threading.Event()
MASK = 0xFFFFFFFF


def u32(off, value):
    ctypes.c_uint32.from_address(base + off).value = value & MASK


def u64(off, value):
    ctypes.c_uint64.from_address(base + off).value = value & (2**64 - 1)


def attempt(fn):
    t0 = time.monotonic()
    try:
        fn()
        out = "ok"
    except hip.HipError as exc:
        out = exc.code.name
    except BaseException as exc:  # the tests fail on any of these
        out = "EXC " + repr(exc)
    return [out, round(time.monotonic() - t0, 3)]


def stream_wait():
    hip.hipStreamWaitEvent(other, ev)
    hip.hipStreamSynchronize(other)  # no timeout: the enqueued wait must end by itself


def query():
    hip.hipEventQuery(ev)


def pending(pid, start, pidns):
    # A record above the floor whose done slot holds another number: pending, made by
    # (pid, start, pidns).
    floor = ctypes.c_uint32.from_address(base + es._FLOOR).value
    seq = (floor + 1) & MASK
    u32(es._DONE + 4 * (seq % es.WINDOW), seq - es.WINDOW)  # its slot holds an older number
    u32(es._STRAGGLER_COUNT, 0)
    u32(es._RECORDER_PID, pid)
    u64(es._RECORDER_START, start)
    u32(es._RECORDER_PIDNS, pidns)
    u32(es._VERSION, 0)
    u32(es._RECORDED, seq)


def fill(seed):
    rng = random.Random(seed)
    if seed % 2:  # anything at all
        ctypes.memmove(base, rng.randbytes(256), 256)
        return
    # Counters that pass the range checks, everything else random.
    floor = rng.getrandbits(32)
    ctypes.memmove(base, rng.randbytes(64), 64)  # where a lock word used to be
    u32(es._FLOOR, floor)
    u32(es._RECORDED, floor + rng.randrange(0, 40))
    u32(es._STRAGGLER_COUNT, rng.randrange(0, es.STRAGGLERS + 1))
    for i in range(es.STRAGGLERS):
        u32(es._STRAGGLER_LIST + 4 * i, floor - rng.randrange(0, 4))
    pid = rng.choice([rng.getrandbits(32), rng.randrange(1, 40000), os.getppid(), 0])
    u32(es._RECORDER_PID, pid)
    u64(es._RECORDER_START, rng.getrandbits(64))
    u32(es._RECORDER_PIDNS, rng.choice([own_process()[2], 0, rng.getrandbits(32)]))
    u32(es._VERSION, rng.getrandbits(32))
    ctypes.memmove(base + es._DONE, rng.randbytes(64), 64)


def reset():
    ctypes.memset(base, 0, es.STATE_SIZE)


def ops():
    return {"query": attempt(query), "sync": attempt(lambda: hip.hipEventSynchronize(ev)),
            "stream-wait": attempt(stream_wait),
            "record": attempt(lambda: hip.hipEventRecord(ev, None)),
            "sync-after-record": attempt(lambda: hip.hipEventSynchronize(ev)),
            "record-stream": attempt(lambda: (hip.hipEventRecord(ev, stream),
                                              hip.hipStreamSynchronize(stream)))}


print(json.dumps(list(own_process())), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "fill":
        fill(int(args[0]))
        out = "done"
    elif cmd == "reset":
        reset()
        out = "done"
    elif cmd == "set":
        u32(int(args[0]), int(args[1]))
        out = "done"
    elif cmd == "pending":
        own = own_process()
        pid, start, pidns = (own[i] if a == "self" else int(a) for i, a in enumerate(args))
        pending(pid, start, pidns)
        out = "done"
    elif cmd == "ops":
        out = ops()
    elif cmd == "sync":
        timeout = float(args[0]) if args else None
        out = attempt(lambda: hip.hipEventSynchronize(ev, timeout=timeout))
    elif cmd == "stream-wait":
        out = attempt(stream_wait)
    elif cmd == "sync2":  # through a second open of the same handle
        ev2 = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
        timeout = float(args[0]) if args else None
        out = attempt(lambda: hip.hipEventSynchronize(ev2, timeout=timeout))
        hip.hipEventDestroy(ev2)
    elif cmd == "records":
        for _ in range(int(args[0])):
            hip.hipEventRecord(ev, None)
        out = "done"
    elif cmd == "record":
        out = attempt(lambda: hip.hipEventRecord(ev, None))
    elif cmd == "lock-timeout":
        es.LOCK_TIMEOUT = float(args[0])
        out = "done"
    elif cmd == "hold":
        state._lock()
        out = "held"
    elif cmd == "record-gated":  # a record whose completion waits for "release"
        gate.clear()
        hip.hipLaunchHostFunc(gated, gate.wait, 60)
        out = attempt(lambda: hip.hipEventRecord(ev, gated))
    elif cmd == "release":
        gate.set()
        out = attempt(lambda: hip.hipStreamSynchronize(gated, timeout=60))
    else:
        out = "unknown " + cmd
    print(json.dumps(out), flush=True)
"""


class Peer:
    """A spawned interpreter of this user that opened the event and obeys one-line commands."""

    def __init__(self, raw: bytes) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PEER, raw.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        self.ident = tuple(self._answer("peer start"))

    def _answer(self, what: str):
        line = readline(self.proc.stdout, LIMIT, f"peer ({what})")
        assert line, f"peer died during {what}: exit {self.proc.wait(LIMIT)}"
        return json.loads(line)

    def __call__(self, command: str):
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer(command)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.stdin.close()
            try:
                self.proc.wait(LIMIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(LIMIT)
        self.proc.stdout.close()


@pytest.fixture
def ipc_event():
    ev = hip.hipEventCreateWithFlags(IPC)
    peers: list[Peer] = []

    def peer() -> Peer:
        peers.append(Peer(bytes(hip.hipIpcGetEventHandle(ev))))
        return peers[-1]

    try:
        yield ev, peer
    finally:
        for p in peers:
            p.close()
        hip.hipEventDestroy(ev)


def _only_hiperror(results: dict, context: str) -> None:
    for op, (out, seconds) in results.items():
        assert out in ALLOWED, f"{context}: {op} gave {out}"
        assert seconds < 10, f"{context}: {op} took {seconds} s"


def test_random_bytes_in_the_page_give_hiperror_or_work(ipc_event):
    _ev, peer = ipc_event
    writer, actor = peer(), peer()
    outcomes = set()
    for seed in range(30):
        assert writer(f"fill {seed}") == "done"
        results = actor("ops")
        _only_hiperror(results, f"seed {seed}")
        outcomes.update(out for out, _ in results.values())
    assert writer("reset") == "done"
    assert actor("record")[0] == "ok"
    # Both kinds of answer were seen: the corpus is not all-corrupt or all-valid.
    assert "ok" in outcomes and INVALID in outcomes


@pytest.mark.parametrize(
    "field,value", [(es._RECORDED, 0x7FFFFFFF), (es._STRAGGLER_COUNT, 0xFFFFFFFF)]
)
def test_impossible_counters_fail_waits_at_once(ipc_event, field, value):
    ev, peer = ipc_event
    writer, actor = peer(), peer()
    assert writer(f"set {field} {value}") == "done"
    for command in ("sync", "stream-wait", "record"):
        out, seconds = actor(command)
        assert out == INVALID, command
        assert seconds < QUICK
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventSynchronize(ev)
    assert exc.value.code == E.hipErrorInvalidResourceHandle


@pytest.mark.parametrize("pid", [0, 0xFFFFFFFF, 0x80000000, es._PID_MAX_LIMIT + 1])
def test_a_record_naming_no_possible_process_fails_waits_at_once(ipc_event, pid):
    _ev, peer = ipc_event
    writer, actor = peer(), peer()
    assert writer(f"pending {pid} 0 0") == "done"
    for command in ("sync", "sync 5", "stream-wait"):
        out, seconds = actor(command)
        assert out == INVALID, command  # never OverflowError
        assert seconds < QUICK
    assert actor("ops")["query"][0] in ALLOWED


def test_a_recorder_in_another_pid_namespace_bounds_every_wait(ipc_event):
    """Its exit cannot be detected: a wait without timeout is refused, one with is bounded."""
    _ev, peer = ipc_event
    writer, actor = peer(), peer()
    pid, start, pidns = writer.ident  # alive, but seen from "another namespace"
    assert writer(f"pending {pid} {start} {pidns ^ 0x5A5A}") == "done"
    for command in ("sync", "stream-wait"):
        out, seconds = actor(command)
        assert out == INVALID, command
        assert seconds < QUICK
    out, seconds = actor("sync 0.5")
    assert out == "hipErrorNotReady" and 0.4 < seconds < 5


def test_a_record_of_this_process_that_none_of_its_streams_holds_fails(ipc_event):
    _ev, peer = ipc_event
    actor = peer()
    assert actor("pending self self self") == "done"
    out, seconds = actor("sync")
    assert out == INVALID and seconds < QUICK


def test_a_pending_record_of_this_process_seen_through_another_open_is_pending(ipc_event):
    _ev, peer = ipc_event
    actor = peer()
    assert actor("record-gated")[0] == "ok"
    out, seconds = actor("sync2 0.5")
    assert out == "hipErrorNotReady" and seconds < 5
    assert actor("release")[0] == "ok"
    assert actor("sync2")[0] == "ok"


def test_garbage_where_the_lock_word_was_does_not_matter(ipc_event):
    ev, peer = ipc_event
    writer, actor = peer(), peer()
    for seed in (2, 4, 6):  # even seeds: valid counters, random bytes 0..64
        assert writer(f"fill {seed}") == "done"
        assert writer("reset") == "done"
        assert writer("set 0 4294967295") == "done"
        assert writer("set 16 12345") == "done"
        results = actor("ops")
        assert {op: out for op, (out, _) in results.items()} == dict.fromkeys(results, "ok")
    hip.hipEventRecord(ev, None)
    hip.hipEventSynchronize(ev, timeout=LIMIT)


def test_a_lock_holder_that_is_killed_releases_the_lock(ipc_event):
    ev, peer = ipc_event
    holder, actor = peer(), peer()
    assert holder("hold") == "held"
    assert actor("lock-timeout 0.5") == "done"
    assert actor("record")[0] == "hipErrorLaunchTimeOut"  # really held
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(LIMIT)
    out, seconds = actor("record")
    assert out == "ok" and seconds < QUICK
    hip.hipEventRecord(ev, None)
    hip.hipEventSynchronize(ev, timeout=LIMIT)


def test_a_stopped_lock_holder_makes_records_fail_within_the_bound(ipc_event):
    ev, peer = ipc_event
    holder, actor, waiter = peer(), peer(), peer()
    assert actor("lock-timeout 1") == "done"
    assert actor("record-gated")[0] == "ok"  # reserved now, completes on "release"
    # The gated record is now too far behind the newest to complete without the lock.
    assert actor(f"records {es._LOCKLESS_SPAN}") == "done"
    assert holder("hold") == "held"
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        out, seconds = actor("record")
        assert out == "hipErrorLaunchTimeOut" and 0.9 < seconds < 5
        # Waiters take no lock (the newest record, made on the null stream, is done).
        out, seconds = waiter("sync 0.3")
        assert out == "ok" and seconds < QUICK
        # The far completion cannot take the lock: it fails and marks the page corrupt, so
        # that no waiter anywhere waits for it forever.
        out, _ = actor("release")
        assert out == "hipErrorLaunchFailure"
        for who in (actor, waiter):
            out, seconds = who("sync")
            assert out == INVALID and seconds < QUICK
    finally:
        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait(LIMIT)
    with pytest.raises(hip.HipError) as exc:
        hip.hipEventRecord(ev, None)
    assert exc.value.code == E.hipErrorInvalidResourceHandle


def _record_in_child() -> str:
    es.LOCK_TIMEOUT = 0.5
    try:
        hip.hipEventRecord(_fork_event[0], None)
        return "ok"
    except hip.HipError as exc:
        return exc.code.name


_fork_event: list = []


def test_a_fork_child_does_not_inherit_the_lock():
    """The parent holds the lock at fork: the child's record must wait for it (and time
    out), not run inside the parent's critical section; after the parent lets go it works."""
    ev = hip.hipEventCreateWithFlags(IPC)
    _fork_event[:] = [ev]
    try:
        hip.hipIpcGetEventHandle(ev)
        ev._state._lock()
        try:
            assert in_fork(_record_in_child, timeout=LIMIT) == "hipErrorLaunchTimeOut"
        finally:
            ev._state._unlock()
        assert in_fork(_record_in_child, timeout=LIMIT) == "ok"
        t0 = time.monotonic()
        hip.hipEventRecord(ev, None)
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        assert time.monotonic() - t0 < QUICK
    finally:
        _fork_event.clear()
        hip.hipEventDestroy(ev)


def test_an_ipc_event_keeps_one_descriptor_per_process_and_closes_it():
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    warm = hip.hipEventCreateWithFlags(IPC)  # the store's descriptor, cached on first use
    hip.hipIpcGetEventHandle(warm)
    hip.hipEventDestroy(warm)
    before = fds()
    ev = hip.hipEventCreateWithFlags(IPC)
    hip.hipIpcGetEventHandle(ev)
    assert fds() == before + 1  # the state's lock descriptor; the creation one is closed
    hip.hipEventDestroy(ev)
    assert fds() == before
