"""Streams on the host backend (issue 3): order, asynchrony, the null stream, async copies and
memsets, failure reporting, destroy, and argument checking.

A "gate" is a ``threading.Event`` that a host function waits on (bounded), so a stream can be
held at a known point while the test checks that nothing behind it has run yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hipipc as hip

E = hip.hipError_t
ROOT = Path(__file__).resolve().parent.parent
GATE_LIMIT = 10.0  # no host function in this file blocks longer than this


def code_of(excinfo: pytest.ExceptionInfo) -> E:
    return excinfo.value.code


@pytest.fixture(autouse=True)
def _quiet_device():
    """Start every test with no pending work or unreported failure left by another test."""
    try:
        hip.hipDeviceSynchronize(timeout=5)
    except hip.HipError:
        pass
    yield


@pytest.fixture
def device_mem():
    """hipMalloc that frees at teardown."""
    ptrs: list[int] = []

    def new(nbytes: int) -> int:
        p = hip.hipMalloc(nbytes)
        ptrs.append(p)
        return p

    yield new
    for p in ptrs:
        hip.hipFree(p)


def hold(g: threading.Event) -> None:
    """A host function that blocks its stream until ``g`` is set (bounded)."""
    if not g.wait(GATE_LIMIT):
        raise TimeoutError("gate was never opened")


# -- order and asynchrony --------------------------------------------------------------


def test_work_runs_in_order_off_the_callers_thread(stream):
    s = stream()
    seen: list[tuple[int, int]] = []
    for i in range(300):
        hip.hipLaunchHostFunc(s, lambda i=i: seen.append((i, threading.get_ident())))
    hip.hipStreamSynchronize(s, timeout=10)
    assert [i for i, _ in seen] == list(range(300))
    threads = {t for _, t in seen}
    assert len(threads) == 1, "one stream is worked by one thread"
    assert threads != {threading.get_ident()}, "work ran on the caller's thread"
    # Host functions receive their positional arguments.
    got = []
    hip.hipLaunchHostFunc(s, lambda *a: got.append(a), 1, "two", None)
    hip.hipStreamSynchronize(s, timeout=10)
    assert got == [(1, "two", None)]


def test_two_streams_run_concurrently(stream, gate):
    s1, s2 = stream(), stream()
    g = gate()
    hip.hipLaunchHostFunc(s1, hold, g)
    ran = threading.Event()
    hip.hipLaunchHostFunc(s2, ran.set)
    assert ran.wait(5), "a blocked stream held up another stream"
    g.set()
    hip.hipStreamSynchronize(s1, timeout=10)


def test_enqueue_never_waits_for_earlier_work(stream, gate, device_mem):
    s, other = stream(), stream()
    g, g_other = gate(), gate()
    dev = device_mem(1 << 20)
    host = np.zeros(1 << 20, np.uint8)
    ran: list[int] = []
    pending = hip.hipEventCreate()
    hip.hipLaunchHostFunc(other, hold, g_other)
    hip.hipEventRecord(pending, other)
    try:
        hip.hipLaunchHostFunc(s, hold, g)
        t0 = time.perf_counter()
        for i in range(100):
            hip.hipLaunchHostFunc(s, ran.append, i)
            hip.hipMemsetAsync(dev, i, 1 << 20, s)
            hip.hipMemcpyAsync(host, dev, 1 << 20, hip.hipMemcpyDeviceToHost, s)
        ev = hip.hipEventCreate()
        hip.hipEventRecord(ev, s)
        hip.hipStreamWaitEvent(s, pending, 0)  # an event that is itself pending
        hip.hipLaunchHostFunc(s, ran.append, "last")
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, f"enqueueing 304 operations took {elapsed:.3f} s"
        assert ran == [] and not host.any(), "work behind the gate ran early"
        assert hip.hipStreamQuery(s) == E.hipErrorNotReady
        assert hip.hipEventQuery(ev) == E.hipErrorNotReady
        g.set()
        time.sleep(0.05)
        assert "last" not in ran, "ran past a hipStreamWaitEvent on a pending event"
        g_other.set()
        hip.hipStreamSynchronize(s, timeout=10)
        assert ran == list(range(100)) + ["last"]
        assert (host == 99).all()
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        g.set()
        g_other.set()
        hip.hipStreamSynchronize(s, timeout=10)
        hip.hipEventDestroy(pending)
        hip.hipEventDestroy(ev)


def test_stream_query_before_and_after(stream, gate):
    s = stream()
    assert hip.hipStreamQuery(s) == E.hipSuccess  # nothing enqueued
    g = gate()
    hip.hipLaunchHostFunc(s, hold, g)
    assert hip.hipStreamQuery(s) == E.hipErrorNotReady
    assert type(hip.hipStreamQuery(s)) is E
    g.set()
    hip.hipStreamSynchronize(s, timeout=10)
    assert hip.hipStreamQuery(s) == E.hipSuccess


def test_synchronize_timeouts_raise_not_ready(stream, gate):
    s = stream()
    g = gate()
    hip.hipLaunchHostFunc(s, hold, g)
    t0 = time.monotonic()
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamSynchronize(s, timeout=0.2)
    waited = time.monotonic() - t0
    assert code_of(exc) == E.hipErrorNotReady
    assert 0.15 <= waited < 2.0, waited
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamSynchronize(s, timeout=0)
    assert code_of(exc) == E.hipErrorNotReady
    with pytest.raises(hip.HipError) as exc:
        hip.hipDeviceSynchronize(timeout=0.1)
    assert code_of(exc) == E.hipErrorNotReady
    for bad in (-1, "1", True, [1]):
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(s, timeout=bad)
        assert code_of(exc) == E.hipErrorInvalidValue, bad
        with pytest.raises(hip.HipError) as exc:
            hip.hipDeviceSynchronize(timeout=bad)
        assert code_of(exc) == E.hipErrorInvalidValue, bad
    assert hip.hipStreamQuery(s) == E.hipErrorNotReady  # the timeouts changed nothing
    g.set()
    hip.hipStreamSynchronize(s, timeout=10)
    hip.hipDeviceSynchronize(timeout=10)
    assert hip.hipStreamQuery(s) == E.hipSuccess


def test_device_synchronize_timeout_is_one_deadline_for_all_streams(stream, gate):
    streams = [stream() for _ in range(3)]
    for s in streams:
        hip.hipLaunchHostFunc(s, hold, gate())
    t0 = time.monotonic()
    with pytest.raises(hip.HipError) as exc:
        hip.hipDeviceSynchronize(timeout=0.3)
    waited = time.monotonic() - t0
    assert code_of(exc) == E.hipErrorNotReady
    assert waited < 0.6, f"timeout=0.3 but hipDeviceSynchronize waited {waited:.2f} s"


def _sync_calls():
    def on_stream(s, ev, t):
        hip.hipStreamSynchronize(s, timeout=t)

    def on_event(s, ev, t):
        hip.hipEventSynchronize(ev, timeout=t)

    def on_device(s, ev, t):
        hip.hipDeviceSynchronize(timeout=t)

    return on_stream, on_event, on_device


@pytest.mark.parametrize("call", _sync_calls(), ids=["stream", "event", "device"])
def test_an_infinite_timeout_waits_without_limit(call, stream, gate):
    s, g = stream(), gate()
    ev = hip.hipEventCreate()
    try:
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipEventRecord(ev, s)
        threading.Timer(0.2, g.set).start()
        t0 = time.monotonic()
        call(s, ev, float("inf"))
        assert time.monotonic() - t0 >= 0.15
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        g.set()
        hip.hipStreamSynchronize(s, timeout=10)
        hip.hipEventDestroy(ev)


@pytest.mark.parametrize("call", _sync_calls(), ids=["stream", "event", "device"])
def test_a_nan_timeout_is_invalid_value(call, stream, gate):
    s, g = stream(), gate()
    ev = hip.hipEventCreate()
    try:
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipEventRecord(ev, s)
        with pytest.raises(hip.HipError) as exc:
            call(s, ev, float("nan"))
        assert code_of(exc) == E.hipErrorInvalidValue
    finally:
        g.set()
        hip.hipStreamSynchronize(s, timeout=10)
        hip.hipEventDestroy(ev)


# -- the null stream -------------------------------------------------------------------


@pytest.mark.parametrize("null", [None, 0], ids=["None", "0"])
def test_null_stream_is_asynchronous_to_the_host(null, device_mem):
    """CUDA's default stream returns at once (issue 11 §5); this test asserted the opposite
    before.  Failures are reported at the next synchronize, once, as on any stream."""
    here = threading.get_ident()
    g = threading.Event()
    seen = []
    dev = device_mem(4096)
    host = np.zeros(4096, np.uint8)
    ev = hip.hipEventCreate()
    try:
        hip.hipLaunchHostFunc(null, hold, g)  # holds the null stream
        hip.hipLaunchHostFunc(null, lambda x: seen.append((x, threading.get_ident())), 5)
        hip.hipMemsetAsync(dev, 0xAB, 4096, null)
        hip.hipMemcpyAsync(host, dev, 4096, hip.hipMemcpyDeviceToHost, null)
        hip.hipEventRecord(ev, null)
        assert seen == [] and not host.any(), "null-stream work ran before the call returned"
        assert hip.hipStreamQuery(null) == E.hipErrorNotReady
        assert hip.hipEventQuery(ev) == E.hipErrorNotReady
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(null, timeout=0.1)
        assert code_of(exc) == E.hipErrorNotReady
        g.set()
        hip.hipStreamSynchronize(null, timeout=GATE_LIMIT)
        assert len(seen) == 1 and seen[0][0] == 5 and seen[0][1] != here
        assert (host == 0xAB).all()
        assert hip.hipStreamQuery(null) == E.hipSuccess
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        g.set()
        hip.hipStreamSynchronize(null, timeout=GATE_LIMIT)
        hip.hipEventDestroy(ev)
    # A failing host function on the null stream: not raised by the launch; reported by the
    # next synchronize of the null stream (or the device), with its cause, once.
    boom = ValueError("null boom")

    def fail():
        raise boom

    hip.hipLaunchHostFunc(null, fail)
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamSynchronize(null, timeout=GATE_LIMIT)
    assert code_of(exc) == E.hipErrorLaunchFailure
    assert exc.value.__cause__ is boom
    hip.hipStreamSynchronize(null, timeout=GATE_LIMIT)  # reported already
    hip.hipLaunchHostFunc(null, fail)
    with pytest.raises(hip.HipError) as exc:
        hip.hipDeviceSynchronize(timeout=GATE_LIMIT)
    assert code_of(exc) == E.hipErrorLaunchFailure and exc.value.__cause__ is boom
    hip.hipDeviceSynchronize(timeout=GATE_LIMIT)  # already reported: nothing pending
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamDestroy(null)
    assert code_of(exc) == E.hipErrorInvalidHandle


def test_null_stream_waits_for_blocking_streams_but_not_non_blocking_ones(stream, gate, device_mem):
    """CUDA's legacy default stream: null-stream work first waits for the blocking streams."""
    dev = device_mem(4096)
    blocking, g_b, g_nb = stream(), gate(), gate()
    nonblocking = hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)
    try:
        hip.hipLaunchHostFunc(nonblocking, hold, g_nb)
        hip.hipMemset(dev, 1, 4096)
        hip.hipMemsetAsync(dev, 2, 4096, None)
        hip.hipStreamSynchronize(None, timeout=GATE_LIMIT / 2)  # not held by the gate
        assert hip.hipStreamQuery(None) == E.hipSuccess
        ran, seen = [], []
        hip.hipLaunchHostFunc(blocking, hold, g_b)
        hip.hipLaunchHostFunc(blocking, ran.append, 1)
        assert hip.hipStreamQuery(None) == E.hipErrorNotReady
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(None, timeout=0.1)
        assert code_of(exc) == E.hipErrorNotReady
        hip.hipLaunchHostFunc(None, lambda: seen.append(list(ran)))  # returns at once
        assert seen == []
        time.sleep(0.1)
        assert seen == [], "null-stream work ran before the blocking stream's earlier work"
        g_b.set()
        hip.hipStreamSynchronize(None, timeout=GATE_LIMIT)
        assert seen == [[1]]
        for bad in (2, -1, True, "1", None):
            with pytest.raises(hip.HipError) as exc:
                hip.hipStreamCreateWithFlags(bad)
            assert code_of(exc) == E.hipErrorInvalidValue, bad
    finally:
        g_nb.set()
        hip.hipStreamSynchronize(nonblocking, timeout=10)
        hip.hipStreamDestroy(nonblocking)


# -- async copies and memsets ----------------------------------------------------------


def test_async_copies_and_memsets_run_in_stream_order_with_every_kind(stream, gate, device_mem):
    n = 64 << 10
    s = stream()
    g = gate()
    a, b = device_mem(n), device_mem(n + 4096)
    src = np.arange(n, dtype=np.uint32).view(np.uint8)[:n].copy()
    h_d2h = np.zeros(n, np.uint8)
    h_h2h = bytearray(n)
    h_default = np.zeros(n, np.uint8)
    h_default2 = np.zeros(n, np.uint8)
    snaps: dict[str, np.ndarray] = {}
    view_a = hip.asarray(a, n)
    view_b = hip.asarray(b, n + 4096)

    def snap(name):
        snaps[name] = (view_a.copy(), view_b.copy())

    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipMemsetAsync(a, 0x5A, n, s)
    hip.hipLaunchHostFunc(s, snap, "after_memset")
    hip.hipMemcpyAsync(a, src, n, hip.hipMemcpyHostToDevice, s)
    hip.hipLaunchHostFunc(s, snap, "after_h2d")
    # interior destination pointer: b + 4096
    hip.hipMemcpyAsync(b + 4096, a, n, hip.hipMemcpyDeviceToDevice, s)
    hip.hipMemcpyAsync(h_d2h, b + 4096, n, hip.hipMemcpyDeviceToHost, s)
    hip.hipMemcpyAsync(h_h2h, h_d2h, n, hip.hipMemcpyHostToHost, s)
    hip.hipMemsetAsync(b, 7, 4096, s)
    hip.hipMemcpyAsync(h_default, b + 4096, n, hip.hipMemcpyDefault, s)  # D2H by type
    hip.hipMemsetAsync(a, 0, n, s)
    hip.hipMemcpyAsync(a, h_default, n, hip.hipMemcpyDefault, s)  # H2D by type
    hip.hipMemcpyAsync(h_default2, h_h2h, n, hip.hipMemcpyDefault, s)  # H2H by type
    hip.hipMemcpyAsync(b + 4096, b, 4096, hip.hipMemcpyDefault, s)  # D2D by type (interior)
    hip.hipMemcpyAsync(a, src, n, stream=s)  # kind defaults to hipMemcpyDefault
    # Nothing has run yet: everything is behind the gate.
    assert not view_a.any() and not view_b.any()
    assert not h_d2h.any() and not any(h_h2h) and not h_default.any()
    g.set()
    hip.hipStreamSynchronize(s, timeout=10)
    assert (snaps["after_memset"][0] == 0x5A).all() and not snaps["after_memset"][1].any()
    assert (snaps["after_h2d"][0] == src).all()
    assert (h_d2h == src).all()
    assert bytes(h_h2h) == src.tobytes()
    assert (h_default == src).all() and (h_default2 == src).all()
    assert (view_a == src).all()
    assert (view_b[:4096] == 7).all() and (view_b[4096:8192] == 7).all()
    assert (view_b[8192:] == src[4096:]).all()


def test_bounds_and_argument_errors_are_raised_at_enqueue_time(stream, gate, device_mem):
    s = stream()
    g = gate()
    dev = device_mem(4096)
    host = np.zeros(8192, np.uint8)
    hip.hipLaunchHostFunc(s, hold, g)  # the checks must not wait for the stream
    cases = [
        (
            lambda: hip.hipMemcpyAsync(host, dev, 4097, hip.hipMemcpyDeviceToHost, s),
            E.hipErrorInvalidValue,
        ),
        (
            lambda: hip.hipMemcpyAsync(host, dev + 4000, 97, hip.hipMemcpyDeviceToHost, s),
            E.hipErrorInvalidValue,
        ),
        (
            lambda: hip.hipMemcpyAsync(dev, host, 4097, hip.hipMemcpyHostToDevice, s),
            E.hipErrorInvalidValue,
        ),
        (
            lambda: hip.hipMemcpyAsync(dev, dev + 1, 4096, hip.hipMemcpyDeviceToDevice, s),
            E.hipErrorInvalidValue,
        ),
        (
            lambda: hip.hipMemcpyAsync(host[:10], dev, 11, hip.hipMemcpyDeviceToHost, s),
            E.hipErrorInvalidValue,
        ),
        (
            lambda: hip.hipMemcpyAsync(bytes(16), dev, 16, hip.hipMemcpyDeviceToHost, s),
            E.hipErrorInvalidValue,
        ),  # read-only destination
        (
            lambda: hip.hipMemcpyAsync(host, dev + 8192, 1, hip.hipMemcpyDeviceToHost, s),
            E.hipErrorInvalidValue,
        ),  # not a pointer of this process
        (lambda: hip.hipMemcpyAsync(host, dev, 16, 9, s), E.hipErrorInvalidMemcpyDirection),
        (
            lambda: hip.hipMemcpyAsync(dev, dev, 16, hip.hipMemcpyHostToDevice, s),
            E.hipErrorInvalidValue,
        ),  # int where a host buffer belongs
        (
            lambda: hip.hipMemcpyAsync(host, host, -1, hip.hipMemcpyHostToHost, s),
            E.hipErrorInvalidValue,
        ),
        (lambda: hip.hipMemsetAsync(dev, 1, 4097, s), E.hipErrorInvalidValue),
        (lambda: hip.hipMemsetAsync(dev + 4095, 1, 2, s), E.hipErrorInvalidValue),
        (lambda: hip.hipMemsetAsync(host, 1, 16, s), E.hipErrorInvalidValue),
        (lambda: hip.hipMemsetAsync(dev, "x", 16, s), E.hipErrorInvalidValue),
    ]
    t0 = time.monotonic()
    for i, (call, code) in enumerate(cases):
        with pytest.raises(hip.HipError) as exc:
            call()
        assert code_of(exc) == code, (i, exc.value)
    assert time.monotonic() - t0 < 1.0
    assert hip.hipStreamQuery(s) == E.hipErrorNotReady
    g.set()
    # Refused operations were not enqueued: nothing fails later, memory is untouched.
    hip.hipStreamSynchronize(s, timeout=10)
    assert not hip.asarray(dev, 4096).any() and not host.any()


# -- failures --------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_host_function_exception_is_reported_once_with_cause_and_later_work_runs(stream):
    s = stream()
    boom = Boom("first")
    ran = []

    def fail(exc):
        raise exc

    hip.hipLaunchHostFunc(s, fail, boom)
    hip.hipLaunchHostFunc(s, ran.append, "after")
    ev = hip.hipEventCreate()
    try:
        hip.hipEventRecord(ev, s)
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(s, timeout=10)
        assert code_of(exc) == E.hipErrorLaunchFailure
        assert exc.value.__cause__ is boom
        assert "Boom" in str(exc.value)
        assert ran == ["after"], "work after the failure must still run"
        assert hip.hipEventQuery(ev) == E.hipSuccess
        hip.hipStreamSynchronize(s, timeout=10)  # reported once
        hip.hipDeviceSynchronize(timeout=10)  # ... and not again by the device
        # The stream stays usable, and a later failure is reported (the first one only).
        hip.hipLaunchHostFunc(s, fail, Boom("second"))
        hip.hipLaunchHostFunc(s, fail, Boom("third"))
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(s, timeout=10)
        assert str(exc.value.__cause__) == "second"
        hip.hipStreamSynchronize(s, timeout=10)
    finally:
        hip.hipEventDestroy(ev)


def test_device_synchronize_reports_a_failure_once(stream):
    s = stream()
    boom = Boom("device")
    hip.hipLaunchHostFunc(s, lambda: (_ for _ in ()).throw(boom))
    with pytest.raises(hip.HipError) as exc:
        hip.hipDeviceSynchronize(timeout=10)
    assert code_of(exc) == E.hipErrorLaunchFailure and exc.value.__cause__ is boom
    hip.hipDeviceSynchronize(timeout=10)
    hip.hipStreamSynchronize(s, timeout=10)  # reported already, by the device


def test_device_synchronize_reports_a_failure_of_a_destroyed_stream(stream, gate):
    s = stream()
    g = gate()
    boom = Boom("after destroy")
    ran = []

    def fail():
        raise boom

    hip.hipLaunchHostFunc(s, hold, g)
    hip.hipLaunchHostFunc(s, fail)
    hip.hipLaunchHostFunc(s, ran.append, 1)
    t0 = time.monotonic()
    hip.hipStreamDestroy(s)
    assert time.monotonic() - t0 < 0.2, "hipStreamDestroy waited for the stream's work"
    assert ran == []
    g.set()
    # The destroyed stream itself is refused, and that does not consume its failure.
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamSynchronize(s, timeout=10)
    assert code_of(exc) == E.hipErrorInvalidResourceHandle
    with pytest.raises(hip.HipError) as exc:
        hip.hipDeviceSynchronize(timeout=10)
    assert code_of(exc) == E.hipErrorLaunchFailure and exc.value.__cause__ is boom
    assert ran == [1]
    hip.hipDeviceSynchronize(timeout=10)


def test_device_synchronize_loses_no_failure_of_several_streams(stream):
    s1, s2 = stream(), stream()
    b1, b2 = Boom("one"), Boom("two")

    def fail(exc):
        raise exc

    hip.hipLaunchHostFunc(s1, fail, b1)
    hip.hipLaunchHostFunc(s2, fail, b2)
    reported = []
    for _ in range(3):
        try:
            hip.hipDeviceSynchronize(timeout=10)
        except hip.HipError as exc:
            assert exc.code == E.hipErrorLaunchFailure
            reported.append(exc.__cause__)
            continue
        break
    for s in (s1, s2):  # whatever the device did not report, the stream must
        try:
            hip.hipStreamSynchronize(s, timeout=10)
        except hip.HipError as exc:
            reported.append(exc.__cause__)
    assert {id(e) for e in reported} == {id(b1), id(b2)}, reported


def test_destroy_returns_at_once_and_enqueued_work_still_runs(stream, gate, device_mem):
    s = stream()
    g = gate()
    dev = device_mem(4096)
    host = np.zeros(4096, np.uint8)
    ran = []
    ev = hip.hipEventCreate()
    try:
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipMemsetAsync(dev, 3, 4096, s)
        hip.hipMemcpyAsync(host, dev, 4096, hip.hipMemcpyDeviceToHost, s)
        hip.hipLaunchHostFunc(s, ran.append, "x")
        hip.hipEventRecord(ev, s)
        t0 = time.monotonic()
        hip.hipStreamDestroy(s)
        assert time.monotonic() - t0 < 0.2
        assert ran == [] and hip.hipEventQuery(ev) == E.hipErrorNotReady
        g.set()
        hip.hipEventSynchronize(ev, timeout=10)  # the record on the destroyed stream completes
        hip.hipDeviceSynchronize(timeout=10)
        assert ran == ["x"] and (host == 3).all()
    finally:
        g.set()
        hip.hipEventDestroy(ev)


def _destroyed_cases():
    def sync(s, ev, dev, host):
        hip.hipStreamSynchronize(s, timeout=1)

    def query(s, ev, dev, host):
        hip.hipStreamQuery(s)

    def destroy(s, ev, dev, host):
        hip.hipStreamDestroy(s)

    def launch(s, ev, dev, host):
        hip.hipLaunchHostFunc(s, print)

    def memcpy(s, ev, dev, host):
        hip.hipMemcpyAsync(host, dev, 16, hip.hipMemcpyDeviceToHost, s)

    def memcpy0(s, ev, dev, host):
        hip.hipMemcpyAsync(host, dev, 0, hip.hipMemcpyDeviceToHost, s)

    def memset(s, ev, dev, host):
        hip.hipMemsetAsync(dev, 1, 16, s)

    def record(s, ev, dev, host):
        hip.hipEventRecord(ev, s)

    def wait_unrecorded(s, ev, dev, host):
        hip.hipStreamWaitEvent(s, ev, 0)

    def wait_pending(s, ev, dev, host):
        other = hip.hipStreamCreate()
        g = threading.Event()
        try:
            hip.hipLaunchHostFunc(other, hold, g)
            hip.hipEventRecord(ev, other)
            hip.hipStreamWaitEvent(s, ev, 0)
        finally:
            g.set()
            hip.hipStreamDestroy(other)

    return [
        pytest.param(sync, id="synchronize"),
        pytest.param(query, id="query"),
        pytest.param(destroy, id="destroy"),
        pytest.param(launch, id="launch"),
        pytest.param(memcpy, id="memcpy"),
        pytest.param(memcpy0, id="memcpy-0-bytes"),
        pytest.param(memset, id="memset"),
        pytest.param(record, id="record"),
        pytest.param(wait_unrecorded, id="wait-unrecorded-event"),
        pytest.param(wait_pending, id="wait-pending-event"),
    ]


@pytest.mark.parametrize("use", _destroyed_cases())
def test_a_destroyed_stream_is_refused(use, device_mem):
    s = hip.hipStreamCreate()
    hip.hipStreamDestroy(s)
    ev = hip.hipEventCreate()
    dev = device_mem(4096)
    host = np.zeros(4096, np.uint8)
    try:
        with pytest.raises(hip.HipError) as exc:
            use(s, ev, dev, host)
        assert code_of(exc) == E.hipErrorInvalidResourceHandle
    finally:
        hip.hipEventDestroy(ev)
    hip.hipDeviceSynchronize(timeout=10)
    assert not host.any()


# -- memory freed or closed while an async operation is pending ------------------------

FREED_WHILE_PENDING = textwrap.dedent(r"""
    import os, sys, threading, time
    import numpy as np
    import hipipc as hip

    n = 1 << 20
    # Exported memory, opened by a forked child (before any thread exists).
    shared = hip.hipMalloc(n)
    hip.hipMemset(shared, 0x42, n)
    handle = bytes(hip.hipIpcGetMemHandle(shared))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ptr = hip.hipIpcOpenMemHandle(handle)
            s = hip.hipStreamCreate()
            g = threading.Event()
            out = np.zeros(n, np.uint8)
            hip.hipLaunchHostFunc(s, g.wait, 10)
            hip.hipMemcpyAsync(out, ptr, n, hip.hipMemcpyDeviceToHost, s)
            hip.hipMemsetAsync(ptr + 4096, 0x43, 4096, s)
            # The close waits for the stream (CUDA's implicit synchronization): open its gate.
            threading.Timer(0.3, g.set).start()
            hip.hipIpcCloseMemHandle(ptr)
            junk = [hip.hipMalloc(n) for _ in range(8)]  # would reuse the address
            g.set()
            hip.hipStreamSynchronize(s, timeout=10)
            assert (out == 0x42).all()
            for p in junk:
                hip.hipFree(p)
            hip.hipStreamDestroy(s)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            sys.exit("forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert (hip.asarray(shared, n)[4096:8192] == 0x43).all()  # the closed import's memset ran
    hip.hipFree(shared)

    # Own memory freed before an async copy, memset and copy-into run.
    s = hip.hipStreamCreate()
    g = threading.Event()
    src = hip.hipMalloc(n)
    dst = hip.hipMalloc(n)
    hip.hipMemset(src, 0x11, n)
    out = np.zeros(n, np.uint8)
    hip.hipLaunchHostFunc(s, g.wait, 10)
    hip.hipMemcpyAsync(dst, src, n, hip.hipMemcpyDeviceToDevice, s)
    hip.hipMemcpyAsync(out, dst, n, hip.hipMemcpyDeviceToHost, s)
    hip.hipMemsetAsync(src, 0x22, n, s)
    threading.Timer(0.3, g.set).start()  # hipFree waits for the stream's work first
    hip.hipFree(src)
    hip.hipFree(dst)
    try:
        hip.hipMemcpyAsync(out, src, 1, hip.hipMemcpyDeviceToHost, s)
    except hip.HipError as exc:
        assert exc.code == hip.hipError_t.hipErrorInvalidValue
    else:
        sys.exit("a freed pointer was accepted")
    junk = [hip.hipMalloc(n) for _ in range(8)]
    for p in junk:  # not hipMemset: the null stream would wait for the held stream
        hip.asarray(p, n)[:] = 0x99
    g.set()
    hip.hipStreamSynchronize(s, timeout=10)
    assert (out == 0x11).all(), np.unique(out)
    for p in junk:
        assert (hip.asarray(p, n) == 0x99).all(), "a pinned copy wrote into new memory"
        hip.hipFree(p)
    hip.hipStreamDestroy(s)
    hip.hipDeviceSynchronize(timeout=10)
    print("ok")
""")


def test_async_operations_on_memory_freed_or_closed_before_they_run_do_not_crash():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", FREED_WHILE_PENDING],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.strip() == "ok"


# -- hipStreamWaitEvent within a process and argument checking --------------------------


def test_stream_wait_event_orders_two_streams(stream, gate):
    s1, s2 = stream(), stream()
    g = gate()
    order = []
    ev = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    unrecorded = hip.hipEventCreate()
    try:
        hip.hipStreamWaitEvent(s2, unrecorded, 0)  # never recorded: imposes no wait
        hip.hipLaunchHostFunc(s2, order.append, "s2-free")
        hip.hipStreamSynchronize(s2, timeout=5)
        hip.hipLaunchHostFunc(s1, hold, g)
        hip.hipLaunchHostFunc(s1, order.append, "s1")
        hip.hipEventRecord(ev, s1)
        hip.hipStreamWaitEvent(s2, ev, 0)
        hip.hipLaunchHostFunc(s2, order.append, "s2")
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(s2, timeout=0.2)
        assert code_of(exc) == E.hipErrorNotReady
        assert order == ["s2-free"]
        g.set()
        hip.hipStreamSynchronize(s2, timeout=10)
        assert order == ["s2-free", "s1", "s2"]
        # On the null stream the wait is enqueued too (issue 11 §5): the caller returns.
        g2 = gate()
        hip.hipLaunchHostFunc(s1, hold, g2)
        hip.hipEventRecord(ev, s1)
        hip.hipStreamWaitEvent(None, ev, 0)
        assert hip.hipStreamQuery(None) == E.hipErrorNotReady
        g2.set()
        hip.hipStreamSynchronize(None, timeout=GATE_LIMIT)
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        g.set()
        hip.hipStreamSynchronize(s1, timeout=10)
        hip.hipEventDestroy(ev)
        hip.hipEventDestroy(unrecorded)


def test_stream_wait_event_flags_must_be_zero(stream):
    s = stream()
    ev = hip.hipEventCreate()
    try:
        for flags in (1, 2, -1, None, "0"):
            with pytest.raises(hip.HipError) as exc:
                hip.hipStreamWaitEvent(s, ev, flags)
            assert code_of(exc) == E.hipErrorInvalidValue, flags
        hip.hipStreamWaitEvent(s, ev, 0)
        hip.hipStreamWaitEvent(s, ev)
    finally:
        hip.hipEventDestroy(ev)


def test_wrong_argument_types_are_invalid_value(stream, device_mem):
    s = stream()
    ev = hip.hipEventCreate()
    dev = device_mem(64)
    host = np.zeros(64, np.uint8)
    not_streams = ["s", 1, 1.0, True, object(), ev, np.int64(0)]
    try:
        for bad in not_streams:
            calls = [
                lambda b=bad: hip.hipStreamSynchronize(b, timeout=1),
                lambda b=bad: hip.hipStreamQuery(b),
                lambda b=bad: hip.hipStreamDestroy(b),
                lambda b=bad: hip.hipStreamWaitEvent(b, ev, 0),
                lambda b=bad: hip.hipLaunchHostFunc(b, print),
                lambda b=bad: hip.hipMemcpyAsync(host, dev, 64, hip.hipMemcpyDeviceToHost, b),
                lambda b=bad: hip.hipMemsetAsync(dev, 0, 64, b),
                lambda b=bad: hip.hipEventRecord(ev, b),
            ]
            for i, call in enumerate(calls):
                with pytest.raises(hip.HipError) as exc:
                    call()
                assert code_of(exc) == E.hipErrorInvalidValue, (bad, i)
        for bad in ("e", None, 0, s, object()):
            for call in (
                lambda b=bad: hip.hipStreamWaitEvent(s, b, 0),
                lambda b=bad: hip.hipEventRecord(b, s),
            ):
                with pytest.raises(hip.HipError) as exc:
                    call()
                assert code_of(exc) == E.hipErrorInvalidValue, bad
        for bad in (None, 42, "print"):
            with pytest.raises(hip.HipError) as exc:
                hip.hipLaunchHostFunc(s, bad)
            assert code_of(exc) == E.hipErrorInvalidValue
        hip.hipStreamSynchronize(s, timeout=5)
        assert not host.any()
    finally:
        hip.hipEventDestroy(ev)
