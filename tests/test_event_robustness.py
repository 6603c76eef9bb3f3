"""Events under hostile or unusual conditions: a corrupt shared page, a stuck lock holder,
synchronizing from stream work, fork, and a process that exits with work still enqueued."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from _proc import child_env, in_fork, readline

import hipipc as hip

E = hip.hipError_t
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
LIMIT = 20.0

# A child that opens the event named on its command line and acts on its page.
_OPENER = """
import ctypes, sys, time
import hipipc as hip
from hipipc.backends import eventstate as es
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
state = ev._state
what = sys.argv[2]
if what == "corrupt-stragglers":
    ctypes.c_uint32.from_address(state.addr + es._STRAGGLER_COUNT).value = 1000
elif what == "corrupt-recorded":
    ctypes.c_uint32.from_address(state.addr + es._RECORDED).value = 0x40000000
elif what == "hold-lock":
    state._lock()
print("ready", flush=True)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
hip.hipEventDestroy(ev)
"""


def _opener(raw: bytes, what: str, linger: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _OPENER, raw.hex(), what, str(linger)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )


@pytest.mark.parametrize("what", ["corrupt-stragglers", "corrupt-recorded"])
def test_a_corrupt_page_gives_hiperror_not_a_crash_or_a_hang(what):
    ev = hip.hipEventCreateWithFlags(IPC)
    try:
        proc = _opener(bytes(hip.hipIpcGetEventHandle(ev)), what)
        assert readline(proc.stdout, LIMIT, "opener") == "ready\n"
        assert proc.wait(LIMIT) == 0
        t0 = time.monotonic()
        with pytest.raises(hip.HipError) as exc:
            hip.hipEventRecord(ev, None)
        assert exc.value.code == E.hipErrorInvalidResourceHandle
        assert "corrupt" in exc.value.detail
        assert time.monotonic() - t0 < 2
        # Readers validate too: no IndexError, whatever the answer.
        try:
            assert hip.hipEventQuery(ev) in (E.hipSuccess, E.hipErrorNotReady)
        except hip.HipError as exc:
            assert exc.code == E.hipErrorInvalidResourceHandle
    finally:
        hip.hipEventDestroy(ev)


def test_waits_and_queries_do_not_need_the_lock():
    """A recorder stuck while holding the event's lock (stopped, or in a debugger) cannot
    stall a waiter: waits and queries read the newest record through a seqlock."""
    ev = hip.hipEventCreateWithFlags(IPC)
    proc = _opener(bytes(hip.hipIpcGetEventHandle(ev)), "hold-lock", LIMIT)
    try:
        assert readline(proc.stdout, LIMIT, "opener") == "ready\n"
        t0 = time.monotonic()
        hip.hipEventSynchronize(ev, timeout=5)
        assert hip.hipEventQuery(ev) == E.hipSuccess
        assert time.monotonic() - t0 < 1
    finally:
        proc.kill()
        proc.wait(LIMIT)
    # The holder died with the lock taken: the robust mutex hands it on.
    hip.hipEventRecord(ev, None)
    hip.hipEventSynchronize(ev, timeout=5)
    hip.hipEventDestroy(ev)


def test_synchronizing_from_stream_work_is_refused_not_a_deadlock():
    stream = hip.hipStreamCreate()
    seen: list = []

    def work() -> None:
        for call in (lambda: hip.hipStreamSynchronize(stream), hip.hipDeviceSynchronize):
            try:
                call()
                seen.append("returned")
            except hip.HipError as exc:
                seen.append(exc.code)

    try:
        hip.hipLaunchHostFunc(stream, work)
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        assert seen == [E.hipErrorNotSupported, E.hipErrorNotSupported]
    finally:
        hip.hipStreamDestroy(stream)


def _use_inherited(stream, local, ipc) -> list:
    out = []
    for call in (
        lambda: hip.hipLaunchHostFunc(stream, print),
        lambda: hip.hipEventSynchronize(local, timeout=1),
    ):
        try:
            call()
            out.append("ok")
        except hip.HipError as exc:
            out.append([exc.code.name, "before fork" in exc.detail])
    hip.hipEventRecord(ipc, None)  # shared memory: an inherited IPC event still works
    hip.hipEventSynchronize(ipc, timeout=10)  # the child's (fresh) null stream runs it
    out.append(hip.hipEventQuery(ipc) == E.hipSuccess)
    return out


def test_streams_and_local_events_inherited_over_fork_say_so():
    stream = hip.hipStreamCreate()
    local = hip.hipEventCreate()
    ipc = hip.hipEventCreateWithFlags(IPC)
    gate = threading.Event()
    try:
        hip.hipLaunchHostFunc(stream, gate.wait, LIMIT)
        hip.hipEventRecord(local, stream)  # pending at fork: it completes in the parent only
        got = in_fork(_use_inherited, stream, local, ipc)
        assert got == [["hipErrorInvalidContext", True], ["hipErrorInvalidContext", True], True]
    finally:
        gate.set()
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        for ev in (local, ipc):
            hip.hipEventDestroy(ev)


_EXITS_EARLY = """
import sys, time
import hipipc as hip
ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
stream = hip.hipStreamCreate()
hip.hipLaunchHostFunc(stream, time.sleep, 0.5)
hip.hipEventRecord(ev, stream)
hip.hipStreamDestroy(stream)
print(bytes(hip.hipIpcGetEventHandle(ev)).hex(), flush=True)
sys.stdin.readline()  # the parent has opened the event
"""


def test_exit_lets_enqueued_work_finish():
    """CUDA's rule, kept at exit: destroying a stream or leaving main does not cancel work
    already enqueued, so a peer waiting on its record is released, not failed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXITS_EARLY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        ev = hip.hipIpcOpenEventHandle(bytes.fromhex(readline(proc.stdout, LIMIT).strip()))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        hip.hipEventDestroy(ev)
        assert proc.wait(LIMIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LIMIT)
