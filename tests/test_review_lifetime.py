"""Adversarial lifetime and concurrency checks (review): exit races, fork, descriptors.

Every scenario runs in real child processes against the run's store, and every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

from _proc import child_env, readline, run_json, run_python, wait_pid

import hipipc as hip
from hipipc.arrays import _pin_of

EXPORT_AFTER_EXIT_RULE = """
import atexit, os, pickle, threading, time
# Registered before hipipc's exit rule, so it runs after it (atexit is LIFO): the exit keeps
# going for a while after the rule, as it does with other libraries' exit hooks.
atexit.register(time.sleep, 1.5)
import hipipc as hip
from hipipc.store import HandleStore

store = HandleStore().own_path()
buf = hip.DeviceBuffer.allocate(64)
buf.export()

def late_exporter():
    # A daemon thread still busy when the interpreter exits: it exports just after the exit
    # rule revoked everything and removed the (then empty) store.
    while os.path.isdir(store):
        time.sleep(0.005)
    late = hip.DeviceBuffer.allocate(64)
    event = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
    for make in (late.export, lambda: hip.hipIpcGetEventHandle(event),
                 lambda: pickle.dumps(late)):  # pickling links a send ticket
        try:
            make()
        except hip.HipError:
            pass  # refused: the process is exiting
    time.sleep(60)  # holds late and event: a daemon thread's frame is never torn down

threading.Thread(target=late_exporter, daemon=True).start()
print("ready", flush=True)
"""


def test_an_export_racing_the_exit_rule_leaves_nothing_in_the_store():
    """A daemon thread that exports (memory, an event, a send ticket) after the exit rule ran
    must not leave a name behind, nor recreate the store the rule removed."""
    # A store of its own: the rule removes a store only when it is empty.
    path = f"/dev/shm/hipipc-review-{uuid.uuid4().hex[:8]}"
    try:
        proc = run_python(EXPORT_AFTER_EXIT_RULE, env=child_env(HIPIPC_STORE=path), timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        left = os.listdir(path) if os.path.isdir(path) else None
        assert left is None, f"the store was left behind holding {left}"
    finally:
        shutil.rmtree(path, ignore_errors=True)


POOL_RETURNS_BUFFERS = """
import json, multiprocessing as mp, os
import hipipc as hip

def work(i):
    buf = hip.DeviceBuffer.allocate(16)
    buf.asarray()[:] = i
    return buf  # pickled with a ticket; then the worker exits (maxtasksperchild=1)

if __name__ == "__main__":
    with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        got = pool.map_async(work, range(6)).get(timeout=60)
    print(json.dumps([int(b.asarray()[0]) for b in got]))
"""


def test_a_pool_worker_that_returns_a_buffer_and_exits_does_not_hang_the_pool():
    """A worker sends its result and exits at once (maxtasksperchild): its exit rule must not
    unlink the result's ticket before the parent's result thread has unpickled it, or that
    thread dies and ``Pool.map`` never returns (multiprocessing's result handler does not
    survive an unpickling error)."""
    proc = run_python(POOL_RETURNS_BUFFERS, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert json.loads(proc.stdout.decode().splitlines()[-1]) == [0, 1, 2, 3, 4, 5]


EVENTS_UNDER_A_LOW_FD_LIMIT = """
import json, resource
import hipipc as hip
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
flags = hip.hipEventInterprocess | hip.hipEventDisableTiming
events, failure = [], None
for _ in range(1000):  # bounded: the hard limit stops it near 512
    try:
        events.append(hip.hipEventCreateWithFlags(flags))
        hip.hipIpcGetEventHandle(events[-1])  # exported: the event keeps one descriptor
    except hip.HipError as exc:
        failure = [exc.code.name, str(exc)]
        break
print(json.dumps([len(events), resource.getrlimit(resource.RLIMIT_NOFILE)[0], failure]))
"""


def test_interprocess_events_at_the_fd_limit_raise_it_then_fail_as_out_of_memory():
    """Each interprocess event keeps a descriptor (its OFD lock): past the soft limit the
    limit is raised toward the hard one, and at the hard one creating an event is
    ``hipErrorOutOfMemory`` naming the limit (BRIEF section 6), never a bare OS error."""
    made, soft, failure = run_json(EVENTS_UNDER_A_LOW_FD_LIMIT, timeout=120)
    assert soft == 512 and made > 256, (made, soft, failure)
    assert failure is not None and failure[0] == "hipErrorOutOfMemory", failure
    assert "RLIMIT_NOFILE" in failure[1], failure


REVOKE_WHILE_EVENTS_CHURN = """
import json, sys, threading, time
import hipipc as hip
from hipipc.registry import get_registry

sys.setswitchinterval(1e-5)  # switch threads often: the race needs a switch mid-listing
flags = hip.hipEventInterprocess | hip.hipEventDisableTiming
kept = [hip.hipEventCreateWithFlags(flags) for _ in range(2000)]
stop = threading.Event()

def churn():  # another thread creates and drops events, as at any moment of an exit
    while not stop.is_set():
        hip.hipEventCreateWithFlags(flags)

thread = threading.Thread(target=churn)
thread.start()
failures = []
deadline = time.monotonic() + 4
while time.monotonic() < deadline:
    try:
        get_registry().revoke_all()  # the exit rule's revocation step
    except Exception as exc:
        failures.append(repr(exc))
stop.set()
thread.join(30)
print(json.dumps(failures[:3]))
"""


def test_the_exit_revocation_survives_other_threads_creating_events():
    """revoke_all lists the process's events while other threads create and drop them: the
    listing must not raise (a RuntimeError there skipped every revocation and printed a
    traceback at exit)."""
    assert run_json(REVOKE_WHILE_EVENTS_CHURN, timeout=120) == []


def _fork_while_held(lock, in_child) -> int:
    """Fork while another thread holds ``lock`` (as if it were inside the call that takes it)
    and run ``in_child`` in the child; the child's exit code (AssertionError if it hangs)."""
    held, done = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            done.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                in_child()
                code = 0
            finally:
                os._exit(code)
    finally:
        done.set()
        thread.join(30)
    return wait_pid(pid, 20)


def test_an_inherited_buffer_closes_in_the_child_while_a_parent_thread_was_closing_it():
    """A parent thread inside ``close()`` at fork held the buffer's lock: the child's close
    (or garbage collection) of its inherited copy must not wait for it forever."""
    buf = hip.DeviceBuffer.allocate(64)
    try:
        assert _fork_while_held(buf._lock, buf.close) == 0
        assert not buf.closed  # the parent's buffer is untouched
    finally:
        buf.close()


def test_a_view_dropped_in_the_child_while_a_parent_thread_pinned_its_mapping():
    """A parent thread pinning or unpinning a mapping at fork held its lock: the child drops
    its copy of a numpy view (of memory freed already, so no registry region lists it) and
    must not hang."""
    buf = hip.DeviceBuffer.allocate(64)
    view = buf.asarray()
    buf.close()  # the view alone keeps the mapping now
    mapping = _pin_of(view)._pin._mapping

    state = {"view": view}
    del view
    try:
        assert _fork_while_held(mapping._lock, lambda: state.clear()) == 0
    finally:
        state.clear()


CTRL_C_DURING_THE_EXIT_DRAIN = """
import time
import hipipc as hip
buf = hip.DeviceBuffer.allocate(64)
buf.export()
hip.hipLaunchHostFunc(hip.hipStreamCreate(), time.sleep, 6)  # the exit drain waits for it
print("exiting", flush=True)
"""


def test_ctrl_c_during_the_exit_drain_still_revokes_everything():
    """A second Ctrl-C while the exit rule drains the streams cuts the wait short, but the
    rule still revokes the process's exports and removes its store (it never fails halfway),
    without a traceback."""
    path = f"/dev/shm/hipipc-review-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_DURING_THE_EXIT_DRAIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(HIPIPC_STORE=path),
    )
    try:
        assert readline(proc.stdout, 60).strip() == "exiting"
        time.sleep(1.0)  # inside the drain now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        left = os.listdir(path) if os.path.isdir(path) else None
        assert left is None, f"the store was left behind holding {left}"
        assert b"Traceback" not in err, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(path, ignore_errors=True)


WORK_OUTLIVES_THE_EXIT_DRAIN = """
import time
import hipipc as hip
import hipipc.registry
hipipc.registry.EXIT_DRAIN = 1.0  # the bound (10 s) is not the point here: what follows it is
buf = hip.DeviceBuffer.allocate(64)  # a module global: freed during finalization
hip.hipLaunchHostFunc(hip.hipStreamCreate(), time.sleep, 30)
"""


def test_exit_ends_when_stream_work_outlives_the_exit_drain():
    """The exit drain gives up on work after its bound (10 s; lowered to 1 s here); the
    buffers finalized after it must not wait for that work (the interpreter freezes the
    stream's daemon thread): the process ends soon after the drain, it does not hang."""
    start = time.monotonic()
    proc = run_python(WORK_OUTLIVES_THE_EXIT_DRAIN, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 28  # well before the 30 s of work ends
    assert "did not finish within 1 s of exit; abandoning it" in err, err  # the drain gave up
    assert "Traceback" not in err, err
