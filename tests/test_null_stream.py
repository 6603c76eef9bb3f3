"""The null stream as CUDA's legacy default stream, asynchronous to the host (issue 11 §5).

Rules covered: null-stream calls return at once; null-stream work waits for the work enqueued
before it on blocking streams, and blocking-stream work enqueued after a null-stream operation
waits for it (non-blocking streams do neither); ``hipMemcpy``/``hipMemset`` wait for the null
stream; host functions that call null-stream APIs do not deadlock; failures are reported at
the next synchronize, once; the exit drain covers the null stream; a forked child's null
stream is fresh; torch's "record after a slow kernel" pattern, within and across processes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from _proc import child_env, in_fork, readline, run_python

import hipipc as hip

E = hip.hipError_t
LIMIT = 20.0  # generous: the machine is shared and slow
IPC = hip.hipEventInterprocess | hip.hipEventDisableTiming


@pytest.fixture(autouse=True)
def _quiet_device():
    try:
        hip.hipDeviceSynchronize(timeout=LIMIT)
    except hip.HipError:
        pass
    yield
    try:
        hip.hipDeviceSynchronize(timeout=LIMIT)
    except hip.HipError:
        pass


def hold(g: threading.Event) -> None:
    if not g.wait(LIMIT):
        raise TimeoutError("gate was never opened")


@pytest.fixture
def nonblocking():
    made: list[hip.Stream] = []

    def new() -> hip.Stream:
        made.append(hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking))
        return made[-1]

    yield new
    for s in made:
        hip.hipStreamDestroy(s)


def test_torch_pattern_record_after_a_slow_host_function_is_not_ready_then_synchronizes():
    """torch's event tests: a sleep kernel on the default stream, then a record: the event
    is not ready right after, and synchronizing it succeeds."""
    ev = hip.hipEventCreate()
    try:
        t0 = time.monotonic()
        hip.hipLaunchHostFunc(None, time.sleep, 0.5)
        hip.hipEventRecord(ev, None)
        assert time.monotonic() - t0 < 0.4, "the null stream blocked the host"
        assert hip.hipEventQuery(ev) == E.hipErrorNotReady
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        assert time.monotonic() - t0 >= 0.5
        assert hip.hipEventQuery(ev) == E.hipSuccess
    finally:
        hip.hipEventDestroy(ev)


def test_one_thread_mixing_null_and_blocking_streams_keeps_the_legacy_order(stream):
    """From one thread: each null-stream operation runs after everything enqueued before it
    (on the blocking streams too) and before everything enqueued after it; each stream keeps
    its own order; two blocking streams are not ordered with each other."""
    s1, s2 = stream(), stream()
    order: list[int] = []
    targets = [None, s1, s2]
    on: list[int] = []
    rng = np.random.default_rng(7)
    for i in range(300):
        which = int(rng.integers(3))
        on.append(which)
        if i % 17 == 0:
            hip.hipLaunchHostFunc(targets[which], time.sleep, 0.002)
        hip.hipLaunchHostFunc(targets[which], order.append, i)
    hip.hipDeviceSynchronize(timeout=LIMIT)
    assert sorted(order) == list(range(300))
    position = {op: k for k, op in enumerate(order)}
    for j in range(300):
        if on[j] == 0:  # a null-stream operation
            assert all(position[i] < position[j] for i in range(j)), j
            assert all(position[k] > position[j] for k in range(j + 1, 300)), j
    for which in (1, 2):
        mine = [op for op in order if on[op] == which]
        assert mine == sorted(mine)


def test_null_stream_work_waits_for_earlier_blocking_work_not_for_non_blocking(
    stream, gate, nonblocking
):
    s, nb = stream(), nonblocking()
    g_s, g_nb = gate(), gate()
    ran: list[str] = []
    hip.hipLaunchHostFunc(nb, hold, g_nb)  # held for the whole test: nobody may wait for it
    hip.hipLaunchHostFunc(s, hold, g_s)
    hip.hipLaunchHostFunc(s, ran.append, "blocking")
    hip.hipLaunchHostFunc(None, ran.append, "null")
    time.sleep(0.2)
    assert ran == [], "null-stream work ran before a blocking stream's earlier work"
    g_s.set()
    hip.hipStreamSynchronize(None, timeout=LIMIT)
    assert ran == ["blocking", "null"]
    g_nb.set()


def test_blocking_work_enqueued_after_null_work_waits_for_it_non_blocking_does_not(
    stream, gate, nonblocking
):
    s, nb = stream(), nonblocking()
    g = gate()
    ran: list[str] = []
    free = threading.Event()
    hip.hipLaunchHostFunc(None, hold, g)  # holds the null stream
    hip.hipLaunchHostFunc(None, ran.append, "null")
    hip.hipLaunchHostFunc(s, ran.append, "blocking")
    hip.hipLaunchHostFunc(nb, free.set)
    assert free.wait(LIMIT), "a non-blocking stream waited for the null stream"
    time.sleep(0.1)
    assert ran == [], "blocking-stream work ran before an earlier null-stream operation"
    assert hip.hipStreamQuery(s) == E.hipErrorNotReady
    # An event recorded on the blocking stream stands for the null work too (it waits).
    ev = hip.hipEventCreate()
    try:
        hip.hipEventRecord(ev, s)
        assert hip.hipEventQuery(ev) == E.hipErrorNotReady
        g.set()
        hip.hipEventSynchronize(ev, timeout=LIMIT)
        assert ran == ["null", "blocking"]
    finally:
        hip.hipEventDestroy(ev)


def test_a_stream_created_after_a_null_operation_still_waits_for_it(gate):
    g = gate()
    ran: list[str] = []
    hip.hipLaunchHostFunc(None, hold, g)
    hip.hipLaunchHostFunc(None, ran.append, "null")
    s = hip.hipStreamCreate()
    try:
        hip.hipLaunchHostFunc(s, ran.append, "new stream")
        time.sleep(0.1)
        assert ran == []
        g.set()
        hip.hipStreamSynchronize(s, timeout=LIMIT)
        assert ran == ["null", "new stream"]
    finally:
        hip.hipStreamDestroy(s)


def test_memcpy_and_memset_are_synchronous_after_the_null_stream(gate):
    g = gate()
    n = 1 << 16
    dev = hip.hipMalloc(n)
    try:
        host = np.zeros(n, np.uint8)
        hip.hipLaunchHostFunc(None, hold, g)
        hip.hipMemsetAsync(dev, 1, n, None)  # behind the gate
        threading.Timer(0.3, g.set).start()
        t0 = time.monotonic()
        hip.hipMemcpy(host, dev, n, hip.hipMemcpyDeviceToHost)  # waits, then copies
        assert time.monotonic() - t0 >= 0.25, "hipMemcpy did not wait for the null stream"
        assert (host == 1).all(), "hipMemcpy ran before earlier null-stream work"
        g2 = gate()
        hip.hipLaunchHostFunc(None, hold, g2)
        hip.hipMemsetAsync(dev, 2, n, None)
        threading.Timer(0.3, g2.set).start()
        hip.hipMemset(dev, 3, n)  # after the async memset, not before it
        assert (hip.asarray(dev, n) == 3).all()
        assert hip.hipStreamQuery(None) == E.hipSuccess
    finally:
        hip.hipFree(dev)


def test_memcpy_waits_for_blocking_streams_through_the_null_stream(stream, gate, nonblocking):
    s, nb = stream(), nonblocking()
    g, g_nb = gate(), gate()
    dev = hip.hipMalloc(4096)
    try:
        hip.hipLaunchHostFunc(nb, hold, g_nb)  # never waited for
        hip.hipLaunchHostFunc(s, hold, g)
        hip.hipMemsetAsync(dev, 9, 4096, s)
        threading.Timer(0.3, g.set).start()
        out = bytearray(4096)
        hip.hipMemcpy(out, dev, 4096, hip.hipMemcpyDeviceToHost)
        assert out == b"\x09" * 4096
        g_nb.set()
    finally:
        hip.hipFree(dev)


def test_host_functions_that_call_null_stream_apis_do_not_deadlock(stream):
    s = stream()
    dev = hip.hipMalloc(4096)
    seen: list = []
    done = threading.Event()

    def on_blocking() -> None:
        hip.hipLaunchHostFunc(None, seen.append, "null from blocking")
        hip.hipMemsetAsync(dev, 4, 4096, None)
        hip.hipMemset(dev, 5, 64)  # synchronous: must not wait for itself
        out = bytearray(64)
        hip.hipMemcpy(out, dev, 64, hip.hipMemcpyDeviceToHost)
        seen.append(out[0])
        hip.hipLaunchHostFunc(s, seen.append, "blocking from blocking")
        try:
            hip.hipStreamSynchronize(None)
        except hip.HipError as exc:
            seen.append(exc.code)

    def on_null() -> None:
        hip.hipLaunchHostFunc(s, seen.append, "blocking from null")
        hip.hipLaunchHostFunc(None, seen.append, "null from null")
        hip.hipMemset(dev, 6, 64)
        ev = hip.hipEventCreate()
        hip.hipEventRecord(ev, None)
        hip.hipEventDestroy(ev)
        done.set()

    try:
        hip.hipLaunchHostFunc(s, on_blocking)
        hip.hipLaunchHostFunc(None, on_null)
        assert done.wait(LIMIT), "a host function calling null-stream APIs deadlocked"
        hip.hipDeviceSynchronize(timeout=LIMIT)
        assert seen[0] == 5 and seen[1] == E.hipErrorNotSupported, seen
        assert sorted(map(str, seen[2:])) == sorted(
            ["null from blocking", "blocking from blocking", "blocking from null", "null from null"]
        )
    finally:
        hip.hipFree(dev)


def test_hip_stream_wait_event_on_the_null_stream_is_enqueued(nonblocking, gate):
    nb, g = nonblocking(), gate()
    ev = hip.hipEventCreateWithFlags(hip.hipEventDisableTiming)
    ran: list[str] = []
    try:
        hip.hipLaunchHostFunc(nb, hold, g)
        hip.hipLaunchHostFunc(nb, ran.append, "recorded work")
        hip.hipEventRecord(ev, nb)
        t0 = time.monotonic()
        hip.hipStreamWaitEvent(None, ev, 0)
        hip.hipLaunchHostFunc(None, ran.append, "after the wait")
        assert time.monotonic() - t0 < 1.0 and ran == []
        g.set()
        hip.hipStreamSynchronize(None, timeout=LIMIT)
        assert ran == ["recorded work", "after the wait"]
    finally:
        hip.hipEventDestroy(ev)


def test_a_failure_on_the_null_stream_is_reported_once_and_later_work_still_runs():
    def fail() -> None:
        raise KeyError("null failure")

    ev = hip.hipEventCreate()
    try:
        hip.hipLaunchHostFunc(None, fail)  # not raised here
        hip.hipEventRecord(ev, None)
        hip.hipEventSynchronize(ev, timeout=LIMIT)  # the record after the failure completes
        with pytest.raises(hip.HipError) as exc:
            hip.hipStreamSynchronize(None, timeout=LIMIT)
        assert exc.value.code == E.hipErrorLaunchFailure
        assert isinstance(exc.value.__cause__, KeyError) and "fail" in exc.value.detail
        hip.hipStreamSynchronize(None, timeout=LIMIT)
        hip.hipDeviceSynchronize(timeout=LIMIT)
    finally:
        hip.hipEventDestroy(ev)


EXIT_DRAIN = """
import sys, time
import hipipc as hip

def slow_write(path):
    time.sleep(0.5)
    with open(path, "w") as f:
        f.write("ran")

hip.hipLaunchHostFunc(None, slow_write, sys.argv[1])
print("enqueued", flush=True)
"""


def test_the_exit_drain_runs_null_stream_work(tmp_path):
    out = tmp_path / "ran.txt"
    proc = run_python(EXIT_DRAIN, str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "enqueued"
    assert out.read_text() == "ran", "exit abandoned the null stream's work"


def _child_null_stream() -> list:
    got = []
    t0 = time.monotonic()
    ran: list[int] = []
    hip.hipLaunchHostFunc(None, ran.append, 1)
    hip.hipStreamSynchronize(None, timeout=10)  # the parent's held work is not ours
    got.append(ran == [1] and time.monotonic() - t0 < 5)
    hip.hipDeviceSynchronize(timeout=10)  # the parent's unreported failure is not ours
    got.append("clean")
    return got


def test_a_forked_child_gets_a_fresh_null_stream(gate):
    g = gate()

    def fail() -> None:
        raise ValueError("parent's failure")

    hip.hipLaunchHostFunc(None, fail)
    hip.hipLaunchHostFunc(None, hold, g)  # the parent's null stream is busy at fork
    try:
        assert in_fork(_child_null_stream, timeout=60) == [True, "clean"]
    finally:
        g.set()
    with pytest.raises(hip.HipError) as exc:
        hip.hipStreamSynchronize(None, timeout=LIMIT)
    assert isinstance(exc.value.__cause__, ValueError)  # still the parent's to report


WAITER = """
import sys
import hipipc as hip
ev = hip.hipIpcOpenEventHandle(bytes.fromhex(sys.argv[1]))
print("opened", flush=True)
sys.stdin.readline()
print(int(hip.hipEventQuery(ev)), flush=True)
hip.hipEventSynchronize(ev, timeout=30)
print(int(hip.hipEventQuery(ev)), flush=True)
hip.hipEventDestroy(ev)
"""


def test_an_ipc_event_recorded_on_the_null_stream_completes_in_another_process():
    ev = hip.hipEventCreateWithFlags(IPC)
    raw = bytes(hip.hipIpcGetEventHandle(ev)).hex()
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER, raw],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert readline(proc.stdout, LIMIT, "waiter") == "opened\n"
        g = threading.Event()
        hip.hipLaunchHostFunc(None, hold, g)
        hip.hipEventRecord(ev, None)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert int(readline(proc.stdout, LIMIT, "waiter")) == E.hipErrorNotReady
        g.set()
        assert int(readline(proc.stdout, LIMIT, "waiter")) == E.hipSuccess
        assert proc.wait(LIMIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LIMIT)
        hip.hipEventDestroy(ev)


def test_null_stream_work_keeps_its_buffers_alive_and_free_waits_for_it(gate):
    """Async copies on the null stream hold their host buffer and device mapping until run,
    and hipFree waits for them (CUDA's implicit synchronization of cudaFree)."""
    g = gate()
    n = 1 << 16
    src = hip.hipMalloc(n)
    hip.hipMemset(src, 0x42, n)
    out = np.zeros(n, np.uint8)
    hip.hipLaunchHostFunc(None, hold, g)
    hip.hipMemcpyAsync(out, src, n, hip.hipMemcpyDeviceToHost, None)
    opener = threading.Timer(0.3, g.set)
    opener.start()
    try:
        hip.hipFree(src)  # returns once the pending copy has run
        assert g.is_set() and (out == 0x42).all()
    finally:
        opener.cancel()
        g.set()
    hip.hipStreamSynchronize(None, timeout=LIMIT)


def test_threads_enqueueing_on_null_and_blocking_streams_at_once_neither_deadlock_nor_reorder(
    stream, nonblocking
):
    """Four threads mix the null stream, two blocking streams and a non-blocking one, with
    host functions that enqueue more null-stream work; each thread's legacy order holds."""
    s1, s2, nb = stream(), stream(), nonblocking()
    targets = [None, s1, s2, nb]
    ran: list[tuple[int, int]] = []
    lock = threading.Lock()
    plans: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def note(t: int, i: int) -> None:
        with lock:
            ran.append((t, i))

    def worker(t: int) -> None:
        try:
            rng = np.random.default_rng(t)
            plan = plans.setdefault(t, [])
            for i in range(150):
                which = int(rng.integers(4))
                plan.append(which)
                hip.hipLaunchHostFunc(targets[which], note, t, i)
                if i % 25 == 0:  # stream work that itself enqueues on the null stream
                    hip.hipLaunchHostFunc(targets[which], hip.hipLaunchHostFunc, None, int)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(LIMIT)
    assert not any(th.is_alive() for th in threads) and not errors, errors
    hip.hipDeviceSynchronize(timeout=LIMIT)
    assert len(ran) == 600
    position = {op: k for k, op in enumerate(ran)}
    for t, plan in plans.items():
        for j, which in enumerate(plan):
            if which == 0:  # null: after the thread's earlier blocking/null work, before later
                for i in range(150):
                    if plan[i] == 3:
                        continue  # non-blocking: not ordered with the null stream
                    if i < j:
                        assert position[t, i] < position[t, j], (t, i, j)
                    elif i > j:
                        assert position[t, i] > position[t, j], (t, i, j)
        for which in (0, 1, 2, 3):
            mine = [position[t, i] for i in range(150) if plan[i] == which]
            assert mine == sorted(mine), (t, which)


def test_hip_free_waits_for_enqueued_work_that_uses_the_memory():
    """CUDA's implicit synchronization of cudaFree: a host function enqueued on the
    (asynchronous) null stream with a raw pointer still finds the memory when the caller
    frees it right after enqueueing."""
    ptr = hip.hipMalloc(4096)
    seen: list[int] = []

    def kernel(p: int) -> None:
        time.sleep(0.2)  # still pending when hipFree is called
        view = hip.asarray(p, 4096)
        view[:] = 7
        seen.append(int(view.sum()))

    hip.hipLaunchHostFunc(None, kernel, ptr)
    hip.hipFree(ptr)
    hip.hipDeviceSynchronize(timeout=30)  # raises if the kernel failed
    assert seen == [7 * 4096]
