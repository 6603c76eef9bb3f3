"""The wake-up protocol of IPC events (eventstate's module doc): no lost wake-up, no early one.

A lost wake-up would only show as a wait that ends at its next liveness slice, so these tests
make the slice longer than the wait's timeout (``LIVENESS_INTERVAL`` is read at each wait): a
wake-up that is lost then sleeps until the timeout, where the wait finds the record done and
*returns* (no hipErrorNotReady), so every wait is timed and must end well before it.
Every cross-process wait is bounded (pipe polls, joins and the ``timeout=`` keyword).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
import threading
import time
import traceback

import pytest

import hipipc as hip
from hipipc.backends import eventstate as es

E = hip.hipError_t
SPAWN = mp.get_context("spawn")
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming
LIMIT = 30.0  # per wait and per answer of the peer: generous, the machine is loaded
CYCLES = 400


def _recv(conn, timeout: float = LIMIT):
    if not conn.poll(timeout):
        raise AssertionError(f"no message from the peer within {timeout} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise AssertionError(f"the peer failed:\n{msg[1]}")
    return msg


def _pause(rng: random.Random) -> None:
    """Nothing, a yield, or up to 0.3 ms: the completion lands before, during or after the
    other side goes to sleep."""
    kind = rng.randrange(3)
    if kind == 1:
        time.sleep(0)
    elif kind == 2:
        time.sleep(rng.random() * 0.0003)


def _timed_sync(event) -> None:
    """hipEventSynchronize, failing if it took half its timeout: a lost wake-up."""
    t0 = time.monotonic()
    hip.hipEventSynchronize(event, timeout=LIMIT)
    took = time.monotonic() - t0
    if took > LIMIT / 2:
        raise AssertionError(f"a wait took {took:.1f} s: a lost wake-up")


def _ping_peer(conn, ping_raw: bytes, pong_raw: bytes, cycles: int, seed: int) -> None:
    """Record ``ping`` after a random pause, then wait for ``pong``; ``cycles`` times, in step
    with the parent through the pipe (so that every wait is for the record of its cycle)."""
    try:
        es.LIVENESS_INTERVAL = 2 * LIMIT  # a lost wake-up fails by timeout (module doc)
        ping = hip.hipIpcOpenEventHandle(ping_raw)
        pong = hip.hipIpcOpenEventHandle(pong_raw)
        stream = hip.hipStreamCreate()
        rng = random.Random(seed)
        conn.send("ready")
        for i in range(cycles):
            hip.hipLaunchHostFunc(stream, _pause, rng)
            hip.hipEventRecord(ping, stream)
            conn.send(i)  # the record exists: the parent's wait is for it
            if _recv(conn) != i:
                raise AssertionError("out of step")
            _timed_sync(pong)
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ping)
        hip.hipEventDestroy(pong)
        conn.send("done")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        sys.exit(1)


def test_record_synchronize_ping_pong_across_processes_loses_no_wakeup(monkeypatch):
    """Many record/synchronize cycles between two processes, in both directions, with the
    completion landing before, while and after the waiter goes to sleep; a second waiter
    thread in this process waits on the same event meanwhile (a wake-all must wake both)."""
    monkeypatch.setattr(es, "LIVENESS_INTERVAL", 2 * LIMIT)
    ping = hip.hipEventCreateWithFlags(IPC)
    pong = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreate()
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(
        target=_ping_peer,
        args=(
            child,
            bytes(hip.hipIpcGetEventHandle(ping)),
            bytes(hip.hipIpcGetEventHandle(pong)),
            CYCLES,
            1234,
        ),
        daemon=True,
    )
    proc.start()
    child.close()
    errors: list[BaseException] = []
    stop = threading.Event()

    def second_waiter() -> None:
        while not stop.is_set():
            try:
                _timed_sync(ping)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return
            time.sleep(0.0005)  # not a busy loop while the event is complete

    rng = random.Random(99)
    try:
        assert _recv(conn) == "ready"
        thread = threading.Thread(target=second_waiter, daemon=True)
        thread.start()
        for i in range(CYCLES):
            assert _recv(conn) == i
            _timed_sync(ping)
            hip.hipLaunchHostFunc(stream, _pause, rng)
            hip.hipEventRecord(pong, stream)
            conn.send(i)
        assert _recv(conn) == "done"
        stop.set()
        thread.join(LIMIT)
        assert not thread.is_alive(), "the second waiter never returned"
        assert not errors, errors
        proc.join(LIMIT)
        assert proc.exitcode == 0
    finally:
        stop.set()
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        conn.close()
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ping)
        hip.hipEventDestroy(pong)


@pytest.mark.skipif(es._SYS_FUTEX is None, reason="no futex on this architecture")
def test_a_wake_up_without_the_completion_does_not_release_the_waiter():
    """The waiter returns right after a wake-up only when its record's slot says done: a
    wake-up for another reason (here: generation bumped and FUTEX_WAKE made by hand, as a
    completion of a newer record would) sends it back to sleep."""
    ev = hip.hipEventCreateWithFlags(IPC)
    stream = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    gate = threading.Event()
    hip.hipLaunchHostFunc(stream, gate.wait, LIMIT)
    hip.hipEventRecord(ev, stream)
    state = ev._state
    result: list[object] = []

    def waiter() -> None:
        try:
            hip.hipEventSynchronize(ev, timeout=LIMIT)
            result.append("ok")
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    try:
        thread.start()
        for _ in range(20):
            time.sleep(0.01)
            state._generation.value = (state._generation.value + 1) & 0xFFFFFFFF
            es._futex_wake_all(state._futex)
        assert thread.is_alive() and not result, result
        gate.set()
        thread.join(LIMIT)
        assert result == ["ok"]
    finally:
        gate.set()
        hip.hipStreamSynchronize(stream, timeout=LIMIT)
        hip.hipStreamDestroy(stream)
        hip.hipEventDestroy(ev)
