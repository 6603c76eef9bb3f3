"""BRIEF section 6: crashed exporters are collected (pid-reuse safe), a full tmpfs is
hipErrorOutOfMemory and never SIGBUS, many processes share handles concurrently, and
thousands of allocations and imports fit in a soft RLIMIT_NOFILE of 1024.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import numpy as np
import pytest
from _proc import Exporter, child_env, readline, run_json, store_names

import hipipc as hip
from hipipc.handle import HandleKind
from hipipc.registry import get_registry
from hipipc.store import _EXPORTER, _IDENTITY, HandleStore, process_start_time

E = hip.hipError_t
SPAWN = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def store_left_as_found():
    """Each test here must leave the run's store as it found it: nothing leaks."""
    before = store_names()
    yield
    assert store_names() - before == set()


def name_of(raw: bytes) -> str:
    return hip.IpcMemHandle(raw).segment_name


def hipipc_gc() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "hipipc", "gc"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


OPENS = """
import json, sys
import hipipc as hip
out = []
for raw in sys.argv[1:]:
    try:
        ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(raw))
    except hip.HipError as exc:
        out.append(exc.code.name)
    else:
        out.append("ok")
        hip.hipIpcCloseMemHandle(ptr)
print(json.dumps(out))
"""


# -- collecting dead exporters ---------------------------------------------------------


def test_gc_removes_a_killed_exporters_segments_and_keeps_a_live_ones():
    with Exporter([4096]) as live, Exporter([1 << 20, 4096]) as doomed:
        dead_names = {name_of(raw) for raw in doomed.handles}
        live_name = name_of(live.handles[0])
        doomed.proc.send_signal(signal.SIGKILL)
        assert doomed.proc.wait(30) == -signal.SIGKILL
        assert dead_names | {live_name} <= store_names()  # nothing cleans up by itself
        out = hipipc_gc()
        for name in dead_names:
            assert f"removed {name[:12]}" in out
        assert not dead_names & store_names() and live_name in store_names()
        assert run_json(OPENS, live.handles[0].hex(), doomed.handles[0].hex()) == [
            "ok",
            "hipErrorInvalidHandle",
        ]
        doomed.kill()  # closes its pipes; it is long dead


def test_gc_removes_a_killed_exporter_its_parent_has_not_reaped_yet():
    # A SIGKILLed process stays a zombie until its parent waits for it; its pid and start
    # time are still in /proc, but it can never run again.  Its segments are orphans.
    with Exporter([4096]) as doomed:
        name = name_of(doomed.handles[0])
        os.kill(doomed.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not _is_zombie(doomed.pid):
            assert time.monotonic() < deadline, "the killed exporter never became a zombie"
            time.sleep(0.005)
        out = hipipc_gc()
        assert f"removed {name[:12]}" in out and name not in store_names()
        doomed.kill()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # A leader shows "Z" while its other threads still exit (field 20, num_threads > 1).
    return fields[0] == b"Z" and fields[17] == b"1"


FIRST_EXPORT = """
import json, os, sys
import hipipc as hip
from hipipc.store import HandleStore
before = {name for name, _, _ in HandleStore().entries()}
ptr = hip.hipMalloc(64)
hip.hipIpcGetMemHandle(ptr)  # the first export of this process sweeps the store
after = {name for name, _, _ in HandleStore().entries()}
hip.hipFree(ptr)
print(json.dumps([sorted(before), sorted(after)]))
"""


def test_the_first_export_of_a_process_sweeps_dead_exporters():
    with Exporter([4096]) as live, Exporter([4096]) as doomed:
        dead, alive = name_of(doomed.handles[0]), name_of(live.handles[0])
        doomed.proc.kill()
        doomed.proc.wait(30)
        before, after = run_json(FIRST_EXPORT)
        assert dead in before and alive in before
        assert dead not in after and alive in after
        doomed.kill()


# Header offsets, from the store's own layout: identity, then pid, reserved, start time.
assert _EXPORTER.format == "<IIQd", "the exporter record changed; update the offsets"
PID_AT = _IDENTITY.size
START_AT = _IDENTITY.size + struct.calcsize("<II")


@pytest.fixture
def temp_store():
    """A store of its own; this process publishes segments in it through HandleStore."""
    template = f"/dev/shm/hipipc-life-{uuid.uuid4().hex[:10]}-{{uid}}"
    store = HandleStore(template)
    yield store
    store.close()
    shutil.rmtree(store.own_path(), ignore_errors=True)


def publish(store: HandleStore) -> tuple[str, int]:
    """Publish one segment; return its name and a read-write descriptor to its header."""
    handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
    fd = store.create(handle, 4096)
    store.publish(fd, handle, 0o600)
    return handle.segment_name, fd


def header_of(store: HandleStore, name: str):
    return {n: info for n, info, _ in store.entries()}[name]


def test_a_reused_pid_does_not_keep_a_dead_exporters_segment(temp_store):
    name, fd = publish(temp_store)
    try:
        info = header_of(temp_store, name)
        assert info.pid == os.getpid() and info.start_time == process_start_time(os.getpid())
        assert info.exporter_alive() and temp_store.collect() == []
        # Same pid, another start time: the pid was reused by a newer process.
        os.pwrite(fd, struct.pack("<Q", info.start_time + 1), START_AT)
        assert not header_of(temp_store, name).exporter_alive()
        assert temp_store.collect() == [name]
        assert name not in {n for n, _, _ in temp_store.entries()}
    finally:
        os.close(fd)


def test_a_live_process_with_the_recorded_start_time_keeps_its_segment(temp_store):
    with Exporter([64]) as other:
        name, fd = publish(temp_store)
        try:
            # Record another live process (the exporter child) as the owner: still alive.
            start = process_start_time(other.pid)
            os.pwrite(fd, struct.pack("<I", other.pid), PID_AT)
            os.pwrite(fd, struct.pack("<Q", start), START_AT)
            assert header_of(temp_store, name).exporter_alive()
            assert temp_store.collect() == []
            # A pid that cannot exist (above pid_max) is dead.
            with open("/proc/sys/kernel/pid_max") as f:
                os.pwrite(fd, struct.pack("<I", int(f.read()) + 1), PID_AT)
            assert temp_store.collect() == [name]
        finally:
            os.close(fd)


def test_gc_leaves_files_it_cannot_parse(temp_store):
    name, fd = publish(temp_store)
    os.close(fd)
    path = temp_store.own_path()
    stray = os.path.join(path, "not-a-segment")
    with open(stray, "wb") as f:
        f.write(b"something else" * 10)
    os.pwrite(fd2 := os.open(os.path.join(path, name), os.O_RDWR), b"garbage!", 0)
    os.close(fd2)
    assert temp_store.collect() == []
    assert sorted(os.listdir(path)) == sorted([name, "not-a-segment"])


# -- a full tmpfs ----------------------------------------------------------------------

SMALL_TMPFS = """
import json, os, signal, subprocess, sys, time
import hipipc as hip
from hipipc.store import HandleStore

MiB = 1 << 20
mnt = sys.argv[1]
store = HandleStore().own_path()
out = {}

def free_mib():
    st = os.statvfs(mnt)
    return round(st.f_bavail * st.f_frsize / MiB, 2)

def code_of(nbytes):
    try:
        ptr = hip.hipMalloc(nbytes)
    except hip.HipError as exc:
        return exc.code.name
    hip.hipFree(ptr)
    return "ok"

out["free_at_start"] = free_mib()
out["malloc_8mib"] = code_of(8 * MiB)
ptr = hip.hipMalloc(2 * MiB)
hip.hipMemset(ptr, 1, 2 * MiB)  # every page, reserved up front: no SIGBUS
out["second_3mib"] = code_of(3 * MiB)
handle = bytes(hip.hipIpcGetMemHandle(ptr))

# An importer touching every page of the export, in another process.
pid = os.fork()
if pid == 0:
    code = 1
    try:
        imp = hip.hipIpcOpenMemHandle(handle)
        hip.hipMemset(imp, 2, 2 * MiB)
        hip.hipIpcCloseMemHandle(imp)
        code = 0
    finally:
        os._exit(code)
deadline = time.monotonic() + 30
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit("importer hung")
    time.sleep(0.005)
out["importer_ok"] = True
view = hip.asarray(ptr, 2 * MiB)
out["importer_wrote"] = int(view.min()) == int(view.max()) == 2
del view
hip.hipFree(ptr)
out["free_after_free"] = free_mib()

# A killed exporter's segment holds its space until gc.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        p = hip.hipMalloc(3 * MiB)
        hip.hipIpcGetMemHandle(p)
        os.write(w, b"k")
        time.sleep(60)
    finally:
        os._exit(1)
os.close(w)
os.read(r, 1)
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
out["while_orphaned"] = code_of(2 * MiB)
gc = subprocess.run([sys.executable, "-m", "hipipc", "gc"], capture_output=True, timeout=60)
out["gc_rc"] = gc.returncode
out["after_gc"] = code_of(2 * MiB)
out["left"] = os.listdir(store)
out["free_at_end"] = free_mib()
print(json.dumps(out))
"""


def test_a_full_tmpfs_is_out_of_memory_never_sigbus():
    mnt = tempfile.mkdtemp(prefix="hipipc-tmpfs-")
    try:
        probe = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount -t tmpfs -o size=4m tmpfs "$1" && umount "$1"',
                "sh",
                mnt,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode != 0:
            pytest.skip(
                f"cannot mount a private tmpfs here (unshare -m + mount): {probe.stderr.strip()}"
            )
        # The whole scenario runs inside the private mount namespace, store on the tmpfs.
        proc = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount -t tmpfs -o size=4m tmpfs "$1" && exec "$2" -c "$3" "$1"',
                "sh",
                mnt,
                sys.executable,
                textwrap.dedent(SMALL_TMPFS),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=child_env(HIPIPC_STORE=os.path.join(mnt, "store-{uid}")),
        )
        assert proc.returncode != -signal.SIGBUS, "SIGBUS"
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        got = json.loads(proc.stdout.splitlines()[-1])
        assert got["free_at_start"] == 4.0
        assert got["malloc_8mib"] == "hipErrorOutOfMemory"
        assert got["second_3mib"] == "hipErrorOutOfMemory"
        assert got["importer_ok"] and got["importer_wrote"]
        assert got["free_after_free"] == 4.0
        assert got["while_orphaned"] == "hipErrorOutOfMemory"
        assert got["gc_rc"] == 0 and got["after_gc"] == "ok"
        assert got["left"] == [] and got["free_at_end"] == 4.0
        assert os.listdir(mnt) == []  # the mount never leaked out of the namespace
    finally:
        os.rmdir(mnt)


# -- many processes on the same handles ------------------------------------------------

WORKERS, BUFFERS, SLOT, REVOKED = 6, 4, 1024, 3
MIN_ROUNDS = 40


def _hammer(raws: list[bytes], rank: int, start, results) -> None:
    """Open (twice), check, write and close every handle, round after round.

    Each worker owns one slot of every buffer, so its slot must always hold what it wrote
    last.  Buffer REVOKED is freed by the exporter mid-run: opens of it may then fail, but
    only with hipErrorInvalidResourceHandle.
    """
    try:
        start.wait(60)
        last = [0] * len(raws)
        opened_revoked = refused = rounds = 0
        deadline = time.monotonic() + 60
        while rounds < MIN_ROUNDS or not refused:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: revocation never seen")
            rounds += 1
            for i in (rounds + rank + k for k in range(len(raws))):  # a different order each
                i %= len(raws)
                try:
                    ptr = hip.hipIpcOpenMemHandle(raws[i])
                except hip.HipError as exc:
                    if i == REVOKED and exc.code == E.hipErrorInvalidResourceHandle:
                        refused += 1
                        continue
                    raise
                again = hip.hipIpcOpenMemHandle(raws[i])
                assert again == ptr, "a second open gave another pointer"
                view = hip.asarray(ptr + rank * SLOT * 4, SLOT, np.uint32)
                if not (view == last[i]).all():
                    raise AssertionError(f"rank {rank} buffer {i}: slot changed under it")
                view[:] = last[i] = rounds
                del view
                hip.hipIpcCloseMemHandle(again)
                hip.hipIpcCloseMemHandle(ptr)
                opened_revoked += i == REVOKED
        results.put((rank, "ok", last, opened_revoked, refused, get_registry().live_counts()))
    except BaseException as exc:
        results.put((rank, "error", repr(exc), 0, 0, None))


# Same rule on both transports (conftest's ``transport``); the rest of this file is about the
# store's files, descriptors and directory: the differences that are the fd transport's point.
@pytest.mark.usefixtures("transport")
def test_six_processes_open_close_and_write_the_same_handles_concurrently():
    size = WORKERS * SLOT * 4
    ptrs = [hip.hipMalloc(size) for _ in range(BUFFERS)]
    freed = set()
    procs = []
    try:
        for ptr in ptrs:
            hip.hipMemset(ptr, 0, size)
        raws = [bytes(hip.hipIpcGetMemHandle(ptr)) for ptr in ptrs]
        start, results = SPAWN.Barrier(WORKERS + 1), SPAWN.Queue()
        procs = [
            SPAWN.Process(target=_hammer, args=(raws, r, start, results)) for r in range(WORKERS)
        ]
        for p in procs:
            p.start()
        start.wait(60)
        # Revoke one buffer once every worker has written it a few times.
        slots = hip.asarray(ptrs[REVOKED], (WORKERS, SLOT), np.uint32)
        deadline = time.monotonic() + 60
        while not (slots[:, 0] >= 5).all():
            assert time.monotonic() < deadline, f"workers stalled: {slots[:, 0]}"
            time.sleep(0.001)
        del slots
        hip.hipFree(ptrs[REVOKED])
        freed.add(REVOKED)
        replies = sorted(results.get(timeout=90) for _ in procs)
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * WORKERS
        for rank, status, last, opened_revoked, refused, counts in replies:
            assert status == "ok", (rank, last)
            assert opened_revoked >= 5 and refused >= 1 and counts == (0, 0)
            for i, ptr in enumerate(ptrs):
                if i in freed:
                    continue
                slot = hip.asarray(ptr + rank * SLOT * 4, SLOT, np.uint32)
                assert (slot == last[i]).all(), (rank, i)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        for i, ptr in enumerate(ptrs):
            if i not in freed:
                hip.hipFree(ptr)


# -- many threads on one store ---------------------------------------------------------

THREADS = """
import collections, json, os, sys, threading, time
import hipipc as hip
from hipipc.handle import HandleKind
from hipipc.store import HandleStore

sys.setswitchinterval(1e-6)  # switch threads often: widen any window between two steps
stale = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, 4096, 0, os.geteuid())
errors = collections.Counter()
done = collections.Counter()
stop = time.monotonic() + float(sys.argv[1])

def fds():
    return len(os.listdir("/proc/self/fd"))

def exporter():
    while time.monotonic() < stop:
        try:
            ptr = hip.hipMalloc(4096)
            try:
                hip.hipIpcGetMemHandle(ptr)
            finally:
                hip.hipFree(ptr)
            done["exports"] += 1
        except Exception as exc:
            errors[repr(exc)[:160]] += 1

def prober():
    # A handle that names nothing in this uid's own store: every open misses.
    while time.monotonic() < stop:
        try:
            hip.hipIpcOpenMemHandle(stale)
        except hip.HipError as exc:
            if exc.code != hip.hipError_t.hipErrorInvalidResourceHandle:
                errors["probe " + repr(exc)[:160]] += 1
            done["misses"] += 1

hip.hipFree(hip.hipMalloc(1))
before = fds()
threads = [threading.Thread(target=exporter) for _ in range(3)]
threads += [threading.Thread(target=prober) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
print(json.dumps({"errors": dict(errors), "done": dict(done), "fd_growth": fds() - before,
                  "left": os.listdir(HandleStore().own_path())}))
"""


def test_missed_imports_in_one_thread_do_not_break_exports_in_others():
    # A miss makes the store re-open its cached directory descriptor (a store can be
    # recreated); that must never pull a descriptor out from under another thread that is
    # creating, linking or unlinking a segment through it.
    template = f"/dev/shm/hipipc-threads-{uuid.uuid4().hex[:10]}-{{uid}}"
    try:
        got = run_json(THREADS, "1.5", env=child_env(HIPIPC_STORE=template), timeout=120)
    finally:
        path = template.replace("{uid}", str(os.geteuid()))
        left = os.listdir(path) if os.path.isdir(path) else []
        shutil.rmtree(path, ignore_errors=True)
    assert got["errors"] == {}
    assert got["done"]["exports"] > 100 and got["done"]["misses"] > 100
    assert got["left"] == [] and left == [] and got["fd_growth"] <= 0


# -- a store removed under running processes ------------------------------------------

STORE_REMOVED = """
import json, os, select, shutil, stat, sys
import hipipc as hip
from hipipc.store import HandleStore

store = HandleStore().own_path()
out = {}
first = hip.hipMalloc(64)
old = bytes(hip.hipIpcGetMemHandle(first))
to_child_r, to_child_w = os.pipe()
to_parent_r, to_parent_w = os.pipe()
pid = os.fork()
if pid == 0:  # the importer: caches the store's directory descriptor, then waits
    code = 1
    try:
        hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(old))
        os.write(to_parent_w, b"k")
        if select.select([to_child_r], [], [], 30)[0]:
            new = os.read(to_child_r, 64)
            hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(new))
            code = 0
    finally:
        os._exit(code)
assert select.select([to_parent_r], [], [], 30)[0] and os.read(to_parent_r, 1) == b"k"
hip.hipFree(first)
shutil.rmtree(store)  # an admin's cleanup, or systemd-logind's RemoveIPC
try:
    second = hip.hipMalloc(64)
    new = bytes(hip.hipIpcGetMemHandle(second))
except Exception as exc:
    out["export"] = repr(exc)
    os.kill(pid, 9)
    new = None
else:
    out["export"] = "ok"
    out["store_mode"] = oct(stat.S_IMODE(os.stat(store).st_mode))
    os.write(to_child_w, new)
_, status = os.waitpid(pid, 0)
out["importer_exit"] = os.waitstatus_to_exitcode(status)
if new is not None:
    hip.hipFree(second)
out["left"] = os.listdir(store) if os.path.isdir(store) else []
print(json.dumps(out))
"""


def test_exporters_and_importers_survive_their_store_being_removed():
    # Removing /dev/shm/hipipc-<uid> under running processes (an admin's cleanup,
    # systemd-logind's RemoveIPC) must not leave them unable to export or import.
    template = f"/dev/shm/hipipc-removed-{uuid.uuid4().hex[:10]}-{{uid}}"
    try:
        got = run_json(STORE_REMOVED, env=child_env(HIPIPC_STORE=template), timeout=60)
    finally:
        shutil.rmtree(template.replace("{uid}", str(os.geteuid())), ignore_errors=True)
    assert got == {"export": "ok", "store_mode": "0o711", "importer_exit": 0, "left": []}


# -- descriptors -----------------------------------------------------------------------

FD_EXPORTER = """
import json, os, resource, sys
import hipipc as hip
N = int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

def fds():
    return len(os.listdir("/proc/self/fd"))

out = {"hard": hard}
hip.hipFree(hip.hipMalloc(1))  # the store directory's cached descriptor, once
base = fds()
ptrs = []
with open(sys.argv[1], "wb") as f:
    for i in range(N):
        ptr = hip.hipMalloc(4096)
        hip.hipMemset(ptr, i % 251, 4096)
        ptrs.append(ptr)
        f.write(bytes(hip.hipIpcGetMemHandle(ptr)))
out["exported"] = fds() - base
out["soft_after_export"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print("ready", flush=True)
sys.stdin.readline()  # the importer has finished
for ptr in ptrs:
    hip.hipFree(ptr)
out["after_free"] = fds() - base
try:
    ptrs = [hip.hipMalloc(4096) for _ in range(N)]  # unexported: one descriptor each
except hip.HipError as exc:
    out["unexported"] = [exc.code.name, str(exc)]
    ptrs = []
else:
    out["unexported"] = fds() - base
out["soft_after_unexported"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
for ptr in ptrs:
    hip.hipFree(ptr)
out["after_free_unexported"] = fds() - base
print(json.dumps(out), flush=True)
"""

FD_IMPORTER = """
import json, os, resource, sys
import hipipc as hip
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

def fds():
    return len(os.listdir("/proc/self/fd"))

with open(sys.argv[1], "rb") as f:
    data = f.read()
raws = [data[i:i + 64] for i in range(0, len(data), 64)]
out = {"count": len(raws)}
base = fds()
ptrs = [hip.hipIpcOpenMemHandle(raw) for raw in raws]
# The store directory descriptor is cached (1), and so is one pidfd per exporter (its
# liveness check at open, hipipc.store._Liveness): 2 for 2000 imports of one exporter.
out["imported"] = fds() - base
out["data"] = all(hip.asarray(p, 4096)[4095] == i % 251 for i, p in enumerate(ptrs))
out["same"] = all(hip.hipIpcOpenMemHandle(raw) == p for raw, p in zip(raws, ptrs))
out["opened_twice"] = fds() - base
for p in ptrs:
    hip.hipIpcCloseMemHandle(p)
    hip.hipIpcCloseMemHandle(p)
out["after_close"] = fds() - base
out["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print(json.dumps(out))
"""


def test_thousands_of_allocations_and_imports_fit_a_soft_fd_limit_of_1024(tmp_path):
    n = 2000
    handles = tmp_path / "handles.bin"
    exporter = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FD_EXPORTER), str(handles), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert readline(exporter.stdout, 60, "exporter").strip() == "ready"
        imported = run_json(FD_IMPORTER, str(handles), timeout=120)
        exporter.stdin.write(b"go\n")
        exporter.stdin.flush()
        exported = json.loads(readline(exporter.stdout, 60, "exporter"))
        assert exporter.wait(30) == 0
    finally:
        if exporter.poll() is None:
            exporter.kill()
            exporter.wait(10)
        exporter.stdin.close()
        exporter.stdout.close()
    # Exported allocations and imports hold no descriptor: the soft limit never mattered.
    assert exported["exported"] == 0 and exported["soft_after_export"] == 1024
    assert exported["after_free"] == 0
    assert imported == {
        "count": n,
        "imported": 2,
        "data": True,
        "same": True,
        "opened_twice": 2,
        "after_close": 2,
        "soft": 1024,
    }
    # Unexported allocations need their descriptor; the library raised the soft limit.
    if exported["hard"] >= n + 64:
        assert exported["unexported"] == n
        assert n < exported["soft_after_unexported"] <= exported["hard"]
    else:  # a low hard limit: a clean out-of-memory naming the limit
        code, message = exported["unexported"]
        assert code == "hipErrorOutOfMemory" and "RLIMIT_NOFILE" in message
    assert exported["after_free_unexported"] == 0


FD_EXHAUSTED = """
import json, os, resource
import hipipc as hip
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # no headroom left to raise into
base = len(os.listdir("/proc/self/fd"))
ptrs, out = [], {}
try:
    while len(ptrs) < 1000:
        ptrs.append(hip.hipMalloc(64))
except hip.HipError as exc:
    out["error"] = [exc.code.name, str(exc)]
out["allocated"] = len(ptrs)
hip.hipIpcGetMemHandle(ptrs[0])  # exporting gives its descriptor back
ptrs.append(hip.hipMalloc(64))
out["after_export"] = "ok"
for ptr in ptrs:
    hip.hipFree(ptr)
out["fd_growth"] = len(os.listdir("/proc/self/fd")) - base
print(json.dumps(out))
"""


def test_descriptor_exhaustion_is_out_of_memory_naming_the_limit():
    got = run_json(FD_EXHAUSTED)
    code, message = got["error"]
    assert code == "hipErrorOutOfMemory"
    assert "RLIMIT_NOFILE soft=64, hard=64" in message and "ulimit -Hn" in message
    assert 40 < got["allocated"] < 64
    assert got["after_export"] == "ok" and got["fd_growth"] <= 1  # the cached store directory


# -- the store directory itself ---------------------------------------------------------

_EXPORT_AND_EXIT = """
import os, sys
import hipipc as hip
ptr = hip.hipMalloc(4096)
hip.hipIpcGetMemHandle(ptr)
if sys.argv[1] == "free":
    hip.hipFree(ptr)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
"""


def test_an_exporter_removes_its_empty_store_at_exit_and_keeps_a_used_one(tmp_path):
    """A normal run leaves nothing in /dev/shm, not even an empty store directory, whether it
    freed its exports or not (the exit rule revokes them); a killed exporter's store still
    holds its export (until an open refuses it, or gc)."""
    template = f"/dev/shm/hipipc-exit-{uuid.uuid4().hex[:8]}-{{uid}}"
    path = template.replace("{uid}", str(os.geteuid()))
    env = child_env(HIPIPC_STORE=template)
    try:
        for how, stays in (("free", False), ("keep", False), ("kill", True)):
            proc = subprocess.run(
                [sys.executable, "-c", _EXPORT_AND_EXIT, how],
                env=env,
                capture_output=True,
                timeout=60,
            )
            assert proc.returncode == (-9 if how == "kill" else 0), proc.stderr
            assert os.path.isdir(path) == stays, how
        assert len(os.listdir(path)) == 1
        run_json(
            "import json, hipipc.store as s; print(json.dumps(s.HandleStore().collect()))", env=env
        )
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_store_removed_by_another_process_is_recreated_by_exporters():
    """The exporter that created the store can remove it at exit while this process holds its
    directory descriptor: the next export recreates it, and importers find the new one."""
    ptr = hip.hipMalloc(4096)
    hip.hipIpcGetMemHandle(ptr)
    hip.hipFree(ptr)  # the store is empty again
    # A process that did not create the store never removes it (issue 10, item 8) ...
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_AND_EXIT, "free"],
        env=child_env(),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    path = HandleStore().own_path()
    assert os.path.isdir(path)
    os.rmdir(path)  # ... its creator's exit cleanup does, at any moment
    ptr = hip.hipMalloc(4096)
    try:
        handle = hip.hipIpcGetMemHandle(ptr)
        assert store_names() == {handle.segment_name}
        got = run_json(f"""
import json, hipipc as hip
p = hip.hipIpcOpenMemHandle(bytes.fromhex("{bytes(handle).hex()}"))
hip.hipIpcCloseMemHandle(p)
print(json.dumps("opened"))
""")
        assert got == "opened"
    finally:
        hip.hipFree(ptr)
