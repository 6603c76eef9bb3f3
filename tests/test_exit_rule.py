"""Issue 11 section 1: CUDA's exit rule, a process's memory dies with it.

A normal exit (end of script, ``sys.exit``, an exception reaching the top, a multiprocessing
child finishing, forked or spawned) revokes every export of the process, memory and IPC
events, after the exit drain of its streams; importers that opened already keep their
mappings.  After a kill -9 the next open of the dead exporter's handle refuses it
(``hipErrorInvalidResourceHandle``, "exited") and reclaims the name.  Real processes only.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from _proc import child_env, readline, store_names, wait_pid

import hipipc as hip
from hipipc.liveness import Liveness
from hipipc.store import process_start_time

E = hip.hipError_t
FLAGS = hip.hipEventInterprocess | hip.hipEventDisableTiming


@pytest.fixture(autouse=True)
def store_left_as_found():
    before = store_names()
    yield
    assert store_names() - before == set()


# The exporter: allocates and fills memory, creates an IPC event, prints both handles, waits
# for a line on stdin, then ends the way argv[1] says.  argv[2] "late": a stream's work that
# runs during the exit drain exports one more allocation (it must be revoked too).
EXITER = """
import os, sys, time
import numpy as np
import hipipc as hip

ptr = hip.hipMalloc(4096)
hip.asarray(ptr, 4096)[:] = 7
ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
print(bytes(hip.hipIpcGetMemHandle(ptr)).hex(), bytes(hip.hipIpcGetEventHandle(ev)).hex(),
      flush=True)
if len(sys.argv) > 2 and sys.argv[2] == "late":
    s = hip.hipStreamCreate()
    def late():
        time.sleep(0.5)
        p = hip.hipMalloc(4096)
        print(bytes(hip.hipIpcGetMemHandle(p)).hex(), flush=True)
    hip.hipLaunchHostFunc(s, late)
sys.stdin.readline()
how = sys.argv[1]
if how == "sys.exit":
    sys.exit(3)
if how == "raise":
    raise RuntimeError("uncaught on purpose")
if how == "kill":
    os.kill(os.getpid(), 9)
"""

EXIT_CODES = {"end": 0, "sys.exit": 3, "raise": 1, "kill": -9}


def start_exiter(how: str, *extra: str) -> tuple[subprocess.Popen, bytes, bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(EXITER), how, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        mem, ev = readline(proc.stdout, 60, "exporter").split()
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    return proc, bytes.fromhex(mem), bytes.fromhex(ev)


def finish(proc: subprocess.Popen, how: str) -> list[str]:
    """Let the exporter end; its exit code must be the expected one; the rest of stdout."""
    try:
        out, err = proc.communicate(b"go\n", timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        raise AssertionError("the exporter did not exit in 60 s") from None
    assert proc.returncode == EXIT_CODES[how], err.decode()
    return out.decode().split()


def code_of_open(raw: bytes, event: bool = False) -> tuple[E | None, str]:
    try:
        if event:
            hip.hipEventDestroy(hip.hipIpcOpenEventHandle(raw))
        else:
            hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))
    except hip.HipError as exc:
        return exc.code, str(exc)
    return None, ""


@pytest.mark.parametrize("how", ["end", "sys.exit", "raise"])
def test_a_normal_exit_revokes_memory_and_events_and_importers_keep_their_mapping(how):
    proc, mem, ev = start_exiter(how)
    ptr = hip.hipIpcOpenMemHandle(mem)
    view = hip.asarray(ptr, 4096)  # keeps the mapping after the close below
    hip.hipIpcCloseMemHandle(ptr)  # else a second open here would only count up
    event = hip.hipIpcOpenEventHandle(ev)
    try:
        names = {hip.IpcMemHandle(mem).segment_name, hip.IpcEventHandle(ev).segment_name}
        assert names <= store_names()
        finish(proc, how)
        # Revoked: no new open, and nothing left in the store.
        code, msg = code_of_open(mem)
        assert code == E.hipErrorInvalidResourceHandle and "without freeing" not in msg, msg
        assert code_of_open(ev, event=True)[0] == E.hipErrorInvalidResourceHandle
        assert not names & store_names()
        # Opened before the exit: still the exporter's bytes, still writable; the event works.
        assert np.all(view == 7)
        view[:] = 1
        assert np.all(view == 1)
        assert hip.hipEventQuery(event) == E.hipSuccess
    finally:
        hip.hipEventDestroy(event)


def test_the_exit_revocation_runs_after_the_exit_drain():
    """Work still enqueued at exit runs (CUDA: exit does not cancel it) and what it exports
    is revoked too: the revocation comes after the drain."""
    proc, mem, _ = start_exiter("end", "late")
    out = finish(proc, "end")
    assert len(out) == 1, out  # the late export happened, during the drain
    late = bytes.fromhex(out[0])
    assert code_of_open(late)[0] == E.hipErrorInvalidResourceHandle
    assert code_of_open(mem)[0] == E.hipErrorInvalidResourceHandle


def test_a_killed_exporter_is_refused_at_the_next_open_and_reclaimed():
    proc, mem, ev = start_exiter("kill")
    names = {hip.IpcMemHandle(mem).segment_name, hip.IpcEventHandle(ev).segment_name}
    finish(proc, "kill")  # reaped: gone from /proc
    assert names <= store_names()  # nothing ran at exit
    for raw, event in ((mem, False), (ev, True)):
        code, msg = code_of_open(raw, event)
        assert code == E.hipErrorInvalidResourceHandle and "without freeing" in msg, msg
    assert not names & store_names()  # reclaimed by the refused opens, no gc needed


def test_a_killed_exporter_is_refused_while_still_a_zombie():
    """Killed but not reaped yet: /proc still lists it, it can never run again."""
    proc, mem, ev = start_exiter("kill")
    ptr = hip.hipIpcOpenMemHandle(mem)  # caches the exporter as alive
    hip.hipIpcCloseMemHandle(ptr)
    watch = os.pidfd_open(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        # Wait for the exit without reaping: the pidfd turns readable once every thread is
        # gone (the leader shows "Z" a little earlier, while numpy's threads still exit).
        assert select.select([watch], [], [], 30)[0], "the killed exporter did not exit"
    finally:
        os.close(watch)
    with open(f"/proc/{proc.pid}/stat", "rb") as f:
        assert f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # not reaped: a zombie
    try:
        for raw, event in ((mem, False), (ev, True)):
            code, msg = code_of_open(raw, event)
            assert code == E.hipErrorInvalidResourceHandle and "without freeing" in msg, msg
    finally:
        proc.communicate(timeout=30)


def test_liveness_is_cached_per_exporter_and_catches_a_wrong_start_time():
    live = Liveness()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only sleeps until killed
        time.sleep(60)
        os._exit(0)
    try:
        start = process_start_time(pid)
        assert start is not None and start > 0
        assert live.alive(pid, start, 0)
        assert len(live.cache) == 1
        assert live.alive(pid, start, 0)  # the cached pidfd answers
        assert not live.alive(pid, start + 1, 0)  # same pid, another process (reuse)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while live.alive(pid, start, 0):  # the pidfd turns readable on exit (zombie)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert live.cache == {}
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_pid(pid)
    assert not live.alive(pid, start, 0)  # reaped: pidfd_open fails


def _export_and_return(conn, event: bool) -> None:
    if event:
        ev = hip.hipEventCreateWithFlags(FLAGS)
        conn.send(bytes(hip.hipIpcGetEventHandle(ev)))
    else:
        ptr = hip.hipMalloc(4096)
        conn.send(bytes(hip.hipIpcGetMemHandle(ptr)))
    conn.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("event", [False, True])
def test_a_multiprocessing_child_that_finishes_revokes_its_exports(method, event):
    """A forked child leaves through os._exit (no atexit): the exit rule still runs there,
    from multiprocessing's exit function."""
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_export_and_return, args=(child, event))
    proc.start()
    try:
        assert parent.poll(60), "the child sent nothing in 60 s"
        raw = parent.recv()
        proc.join(60)
        assert proc.exitcode == 0
        code, msg = code_of_open(raw, event)
        assert code == E.hipErrorInvalidResourceHandle and "without freeing" not in msg, msg
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
        parent.close()
        child.close()
