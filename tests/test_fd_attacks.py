"""Adversarial review of the fd transport (issue 13): hostile handles, races, fork, limits.

Each test is an attack written before its fix (or one that held): a handle whose route names
a descriptor that is not a hipipc segment, a stale handle whose descriptor number was reused,
a forked child's exit, the first open of a process at the descriptor limit.  Real processes,
every wait bounded; no mock of the thing under test.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from _proc import Exporter, child_env, run_json

import hipipc as hip
from hipipc.errors import hipError_t as E
from hipipc.fdtransport import fd_route_supported
from hipipc.handle import FdRoute, HandleKind
from hipipc.memfd import F_ADD_SEALS, F_SEAL_WRITE, SEALS
from hipipc.segment import _EXPORTER, _identity, own_process
from hipipc.store import PAGE_SIZE

pytestmark = pytest.mark.skipif(not fd_route_supported(), reason="no fd transport here")

FD_ENV = {"HIPIPC_TRANSPORT": "fd"}
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _forge(fd: int, size: int = 4096, header: bool = True) -> bytes:
    """A handle whose route names this process's descriptor ``fd`` (the importer's own: the
    hostile peer picked its number and inode); its identity written into ``fd`` if asked."""
    pid, start, pidns = own_process()
    route = FdRoute(pid, start, fd, os.fstat(fd).st_ino)
    handle = hip.IpcMemHandle.new(HandleKind.HOST_MEMORY, size, 0, os.geteuid(), route)
    if header:
        os.pwrite(fd, _identity(handle) + _EXPORTER.pack(pid, pidns, start, time.time()), 0)
    return bytes(handle)


def _memfd(size: int, seals: int | None = SEALS) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def _seal(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


def _open_error(raw: bytes) -> hip.HipError:
    before = _fd_count()
    with pytest.raises(hip.HipError) as exc:
        ptr = hip.hipIpcOpenMemHandle(raw)
        hip.hipIpcCloseMemHandle(ptr)  # pragma: no cover - only if the test fails
    assert _fd_count() == before, "a refused open leaked a descriptor"
    return exc.value


@pytest.fixture
def warm_pidfd():
    """One open of a route to this process first, so its pidfd is cached before counting."""
    fd = _memfd(PAGE_SIZE + 4096)
    try:
        raw = _forge(fd)
        _seal(fd, SEALS)
        ptr = hip.hipIpcOpenMemHandle(raw)  # the control: a forged but well-made segment opens
        hip.hipIpcCloseMemHandle(ptr)
    finally:
        os.close(fd)


def _kinds_of_files():
    """(what, descriptor) of files a hostile route may name in the importer."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    tmp = tempfile.TemporaryFile()
    tmp.truncate(PAGE_SIZE + 4096)
    keep = [a, b, tmp]
    return (
        [("pipe", r), ("socket", a.fileno()), ("/dev/zero", zero), ("file", tmp.fileno())],
        [
            r,
            w,
            zero,
        ],
        keep,
    )


def test_routes_naming_the_importers_own_files_that_are_no_segment_are_refused(warm_pidfd):
    named, fds, keep = _kinds_of_files()
    try:
        for what, fd in named:
            raw = _forge(fd, header=False)
            err = _open_error(raw)
            assert err.code == E.hipErrorInvalidResourceHandle, (what, err)
            assert "stale" in str(err), (what, err)
    finally:
        for fd in fds:
            os.close(fd)
        for obj in keep:
            obj.close()


@pytest.mark.parametrize(
    "case",
    ["unsealed", "seal-write", "seal-future-write", "too-small", "forged-header"],
)
def test_hostile_memfds_of_the_right_inode_are_refused_before_mapping(warm_pidfd, case):
    size = 4096
    fd = _memfd(PAGE_SIZE + (size if case != "too-small" else 0))
    try:
        raw = _forge(fd, size)
        if case == "forged-header":
            os.pwrite(fd, os.urandom(64), 0)
        if case == "seal-write":
            _seal(fd, SEALS | F_SEAL_WRITE)
        elif case == "seal-future-write":
            _seal(fd, SEALS | F_SEAL_FUTURE_WRITE)
        elif case != "unsealed":
            _seal(fd, SEALS)
        err = _open_error(raw)
        assert err.code == E.hipErrorInvalidResourceHandle, (case, err)
    finally:
        os.close(fd)


def test_routes_to_pid_1_are_refused():
    from hipipc.segment import process_start_time

    start = process_start_time(1)
    fd = _memfd(PAGE_SIZE + 4096)
    try:
        raw = bytearray(_forge(fd))
        for start_1 in {start if start and start > 0 else 1, 12345}:
            raw[40:] = FdRoute(1, start_1, 0, os.fstat(fd).st_ino).pack()
            with pytest.raises(hip.HipError):  # may cache a pidfd of pid 1: counted after
                hip.hipIpcOpenMemHandle(bytes(raw))
            err = _open_error(bytes(raw))
            assert err.code == E.hipErrorInvalidResourceHandle, err
    finally:
        os.close(fd)


_AT_THE_LIMIT = """
import json, os, resource, sys
import hipipc as hip
from hipipc.registry import get_registry

raw = bytes.fromhex(sys.argv[1])
get_registry()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
filler = []
while True:
    try:
        filler.append(os.dup(0))
    except OSError:
        break
outcomes = []
while filler:
    os.close(filler.pop())  # one more descriptor free each round
    try:
        ptr = hip.hipIpcOpenMemHandle(raw)
    except hip.HipError as exc:
        outcomes.append(exc.code.name)
        continue
    except BaseException as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")
        continue
    hip.hipIpcCloseMemHandle(ptr)
    outcomes.append("opened")
    break
print(json.dumps(outcomes))
"""


def test_the_first_open_of_a_process_at_the_descriptor_limit_is_a_hip_error():
    with Exporter([4096], env=child_env(**FD_ENV)) as exporter:
        outcomes = run_json(_AT_THE_LIMIT, exporter.handles[0].hex())
    assert outcomes[-1] == "opened", outcomes
    assert set(outcomes[:-1]) <= {"hipErrorOutOfMemory"}, outcomes


# -- fork: a child's exit rule is the child's ------------------------------------------------


def _grandchild(raw_parent: bytes, q) -> None:
    import hipipc as hip

    ptr = hip.hipIpcOpenMemHandle(raw_parent)
    hip.hipIpcCloseMemHandle(ptr)
    mine = hip.DeviceBuffer.allocate(4096, transport="fd")
    hip.hipIpcGetMemHandle(mine.ptr)  # starts the grandchild's own server
    q.put("grandchild done")
    # Returns with mine still exported: multiprocessing's exit runs the grandchild's exit rule.


def _child(raw_parent: bytes, q) -> None:
    import multiprocessing as mp

    import hipipc as hip

    ptr = hip.hipIpcOpenMemHandle(raw_parent)
    out = bytearray(8)
    hip.hipMemcpy(out, ptr, 8, hip.hipMemcpyDeviceToHost)
    hip.hipIpcCloseMemHandle(ptr)
    mine = hip.DeviceBuffer.allocate(4096, transport="fd")
    hip.hipIpcGetMemHandle(mine.ptr)  # the child's own export and server
    grand = mp.get_context("fork").Process(target=_grandchild, args=(raw_parent, q))
    grand.start()
    grand.join(60)
    q.put(["child", bytes(out).decode(), grand.exitcode])


_OPEN_BOTH_WAYS = """
import json, sys
import hipipc as hip
from hipipc import fdserver
raw = bytes.fromhex(sys.argv[1])
ptr = hip.hipIpcOpenMemHandle(raw)
out = bytearray(8)
hip.hipMemcpy(out, ptr, 8, hip.hipMemcpyDeviceToHost)
hip.hipIpcCloseMemHandle(ptr)
h = hip.IpcMemHandle(raw)
r = h.fd_route
fd = fdserver.fetch(r.pid, r.start, h.uid, h.segment_name, 30.0)  # the server route
import os
os.close(fd)
print(json.dumps(out.decode()))
"""


def test_a_forked_childs_exit_rule_leaves_the_parents_exports_and_server():
    import multiprocessing as mp

    from hipipc import fdserver

    buf = hip.DeviceBuffer.allocate(4096, transport="fd")
    try:
        hip.hipMemcpy(buf.ptr, b"parental", 8, hip.hipMemcpyHostToDevice)
        raw = bytes(hip.hipIpcGetMemHandle(buf.ptr))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        child = ctx.Process(target=_child, args=(raw, q))
        child.start()
        try:
            got = [q.get(timeout=60), q.get(timeout=60)]
            child.join(60)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(10)
        assert "grandchild done" in got and ["child", "parental", 0] in got, got
        # The parent still exports, by both routes, and its server still runs.
        server = fdserver._state.server
        assert server is not None and server.thread.is_alive()
        route = hip.IpcMemHandle(raw).fd_route
        assert os.fstat(route.fd).st_ino == route.inode
        assert run_json(_OPEN_BOTH_WAYS, raw.hex()) == "parental"
    finally:
        hip.hipFree(buf.ptr)


# -- a stale handle whose descriptor number was reused --------------------------------------

_LOOPING_IMPORTER = """
import sys, os
import hipipc as hip
raw = bytes.fromhex(sys.argv[1])
seen = {"opened": 0, "refused": 0}
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        break
    for _ in range(int(line)):
        try:
            ptr = hip.hipIpcOpenMemHandle(raw)
        except hip.HipError as exc:
            if exc.code != hip.hipError_t.hipErrorInvalidResourceHandle:
                print("wrong code", exc, flush=True)
                sys.exit(3)
            seen["refused"] += 1
            continue
        out = bytearray(8)
        hip.hipMemcpy(out, ptr, 8, hip.hipMemcpyDeviceToHost)
        hip.hipIpcCloseMemHandle(ptr)
        if bytes(out) != b"AAAAAAAA":
            print("WRONG FILE", bytes(out), flush=True)
            sys.exit(4)
        seen["opened"] += 1
    print(seen["opened"], seen["refused"], flush=True)
"""


def test_a_freed_handle_never_opens_the_allocation_that_reused_its_descriptor_number():
    from _proc import readline

    a = hip.DeviceBuffer.allocate(4096, transport="fd")
    hip.hipMemcpy(a.ptr, b"A" * 8, 8, hip.hipMemcpyHostToDevice)
    raw = bytes(hip.hipIpcGetMemHandle(a.ptr))
    number = hip.IpcMemHandle(raw).fd_route.fd
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOPING_IMPORTER, raw.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    reused = 0
    try:
        assert readline(proc.stdout, 60, "importer").strip() == "ready"

        def ask(n: int) -> list[int]:
            proc.stdin.write(f"{n}\n".encode())
            proc.stdin.flush()
            line = readline(proc.stdout, 60, "importer").strip()
            assert not line.startswith(("WRONG", "wrong")) and line, line
            return [int(x) for x in line.split()]

        assert ask(5) == [5, 0]
        hip.hipFree(a.ptr)
        for _ in range(40):  # allocations that take the freed number, exported and filled
            b = hip.DeviceBuffer.allocate(4096, transport="fd")
            hip.hipMemcpy(b.ptr, b"B" * 8, 8, hip.hipMemcpyHostToDevice)
            route = hip.hipIpcGetMemHandle(b.ptr).fd_route
            reused += route.fd == number
            opened, _refused = ask(3)
            assert opened == 5
            hip.hipFree(b.ptr)
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert reused, "no allocation reused the freed number: the attack did not happen"


_INHERIT = """
import json, subprocess, sys
import hipipc as hip
bufs = [hip.DeviceBuffer.allocate(4096, transport="fd") for _ in range(3)]
for b in bufs:
    hip.hipIpcGetMemHandle(b.ptr)  # exported: memfds held, the server running
t = hip.DeviceBuffer.allocate(4096, transport="fd")
ticket = t.__reduce__()  # a send-and-drop ticket: the server holds its own reference
ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))  # a cached pidfd of another exporter
ev = hip.hipEventCreateWithFlags(hip.hipEventInterprocess | hip.hipEventDisableTiming)
hip.hipIpcGetEventHandle(ev)
listing = subprocess.run(["ls", "/proc/self/fd"], capture_output=True, text=True).stdout.split()
hip.hipIpcCloseMemHandle(ptr)
print(json.dumps(sorted(int(x) for x in listing)))
"""


def test_a_subprocess_of_an_exporter_and_importer_inherits_no_descriptor():
    with Exporter([4096], env=child_env(**FD_ENV)) as exporter:
        listing = run_json(_INHERIT, exporter.handles[0].hex(), env=child_env(**FD_ENV))
    assert listing == [0, 1, 2, 3], listing


# -- the exit rule with a pending send-and-drop ticket ---------------------------------------

_TICKETED_EXIT = """
import pickle, sys, time
import hipipc as hip
b = hip.DeviceBuffer.allocate(4096)
hip.hipMemcpy(b.ptr, b"ticketed", 8, hip.hipMemcpyHostToDevice)
print(pickle.dumps(b).hex(), flush=True)
hip.hipFree(b.ptr)  # revoked: only the ticket keeps the memory reachable now
print(time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("receiver", ["within-the-grace", "after-the-exit"])
def test_the_exit_rule_serves_a_pending_fd_ticket_then_revokes_it(receiver):
    import pickle

    from _proc import readline

    from hipipc.registry import TICKET_GRACE

    proc = subprocess.Popen(
        [sys.executable, "-c", _TICKETED_EXIT],
        stdout=subprocess.PIPE,
        env=child_env(**FD_ENV),
    )
    try:
        blob = bytes.fromhex(readline(proc.stdout, 60, "exporter").strip())
        freed_at = float(readline(proc.stdout, 60, "exporter"))
        if receiver == "within-the-grace":
            buf = pickle.loads(blob)
            try:
                out = bytearray(8)
                hip.hipMemcpy(out, buf.ptr, 8, hip.hipMemcpyDeviceToHost)
                assert bytes(out) == b"ticketed"
            finally:
                buf.close()
            assert proc.wait(60) == 0
            # Consumed: the exporter did not sit out the whole grace (generous under load).
            assert time.monotonic() - freed_at < TICKET_GRACE + 30
        else:
            assert proc.wait(60) == 0
            before = _fd_count()
            with pytest.raises(hip.HipError) as exc:
                pickle.loads(blob)
            assert exc.value.code == E.hipErrorInvalidResourceHandle
            assert _fd_count() <= before + 1  # at most a cached pidfd (of a dead process)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- exit with the server busy --------------------------------------------------------------

_BUSY_EXPORTER = """
import sys
import hipipc as hip
b = hip.DeviceBuffer.allocate(1 << 20)
print(bytes(hip.hipIpcGetMemHandle(b.ptr)).hex(), flush=True)
sys.stdin.readline()
# Leaves with the export live: the exit rule revokes it while clients hammer the server.
"""

_HAMMER = """
import json, os, socket, sys, time
import hipipc as hip
from hipipc import fdserver
h = hip.IpcMemHandle(bytes.fromhex(sys.argv[1]))
r = h.fd_route
name = fdserver.socket_name(h.uid, r.pid, r.start)
silent = []
for _ in range(20):  # connected, never asking: the server must not wait for them at exit
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(name)
    silent.append(s)
print("hammering", flush=True)
got, errors, end = 0, [], time.monotonic() + 60
while time.monotonic() < end:
    try:
        os.close(fdserver.fetch(r.pid, r.start, h.uid, h.segment_name, 5.0))
        got += 1
    except hip.HipError as exc:
        if exc.code != hip.hipError_t.hipErrorInvalidResourceHandle:
            errors.append(str(exc))
        break
    except BaseException as exc:
        errors.append(repr(exc))
        break
print(json.dumps({"got": got, "errors": errors, "fds": len(os.listdir("/proc/self/fd"))}))
"""


def test_the_exit_rule_while_clients_hammer_the_server_is_prompt_and_quiet():
    from _proc import readline

    exp = subprocess.Popen(
        [sys.executable, "-c", _BUSY_EXPORTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(**FD_ENV),
    )
    hammer = None
    try:
        raw = readline(exp.stdout, 60, "exporter").strip()
        hammer = subprocess.Popen(
            [sys.executable, "-c", _HAMMER, raw],
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert readline(hammer.stdout, 60, "hammer").strip() == "hammering"
        time.sleep(0.5)
        t0 = time.monotonic()
        exp.stdin.write(b"go\n")
        exp.stdin.flush()
        assert exp.wait(60) == 0
        assert time.monotonic() - t0 < 30
        assert exp.stderr.read() == b""
        report = json.loads(readline(hammer.stdout, 90, "hammer"))
        assert hammer.wait(60) == 0
        assert report["got"] > 0 and report["errors"] == [], report
    finally:
        for p in (exp, hammer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_route_naming_a_thread_id_is_refused_without_a_leak(warm_pidfd):
    import threading

    ready, done = threading.Event(), threading.Event()
    tid = []

    def park() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(60)

    t = threading.Thread(target=park, daemon=True)
    t.start()
    try:
        assert ready.wait(30)
        fd = _memfd(PAGE_SIZE + 4096)
        try:
            raw = bytearray(_forge(fd))
            _seal(fd, SEALS)
            route = hip.IpcMemHandle(bytes(raw)).fd_route
            from hipipc.segment import process_start_time

            raw[40:] = route._replace(pid=tid[0], start=process_start_time(tid[0]) or 1).pack()
            err = _open_error(bytes(raw))
            assert err.code == E.hipErrorInvalidResourceHandle, err
        finally:
            os.close(fd)
    finally:
        done.set()
        t.join(30)


# -- threads and fork ------------------------------------------------------------------------


def _memfds() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:hipipc")
        except OSError:
            pass
    return n


def test_fork_in_the_middle_of_fd_exports_in_other_threads():
    import threading

    from _proc import wait_pid

    errors: list[str] = []
    stop = threading.Event()
    base = _memfds()

    def churn() -> None:
        try:
            while not stop.is_set():
                buf = hip.DeviceBuffer.allocate(4096, transport="fd")
                hip.hipIpcGetMemHandle(buf.ptr)
                hip.hipFree(buf.ptr)
        except BaseException as exc:  # any error is a finding
            errors.append(repr(exc))

    workers = [threading.Thread(target=churn) for _ in range(3)]
    for w in workers:
        w.start()
    codes = []
    try:
        for _ in range(10):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    # The parent's exports are closed here; at most a memfd that a worker was
                    # creating at fork (not yet anyone's) is left, one per worker.
                    left = _memfds() - base
                    mine = hip.DeviceBuffer.allocate(4096, transport="fd")
                    h = hip.hipIpcGetMemHandle(mine.ptr)
                    ok = h.fd_route.pid == os.getpid()
                    hip.hipFree(mine.ptr)
                    code = 0 if ok and left <= len(workers) else 2
                finally:
                    os._exit(code)
            codes.append(wait_pid(pid, 60))
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert errors == [] and codes == [0] * 10, (errors, codes)
    assert _memfds() == base


# -- kill -9 at any step: nothing anywhere ---------------------------------------------------

_CHURNING_EXPORTER = """
import pickle, sys
import hipipc as hip
kept = hip.DeviceBuffer.allocate(4096)
hip.hipIpcGetMemHandle(kept.ptr)
ptr = hip.hipIpcOpenMemHandle(bytes.fromhex(sys.argv[1]))  # an import too
print("churning", flush=True)
flags = hip.hipEventInterprocess | hip.hipEventDisableTiming
while True:
    b = hip.DeviceBuffer.allocate(8192)
    hip.hipIpcGetMemHandle(b.ptr)
    ev = hip.hipEventCreateWithFlags(flags)
    hip.hipIpcGetEventHandle(ev)
    blob = pickle.dumps(b)
    hip.hipEventDestroy(ev)
    hip.hipFree(b.ptr)
"""


def test_kill_9_of_a_churning_fd_exporter_leaves_nothing_in_any_directory(tmp_path):
    import random

    from _proc import readline

    store = tmp_path / "store"
    env = child_env(HIPIPC_STORE=str(store) + "-{uid}", **FD_ENV)
    with Exporter([4096], env=child_env(**FD_ENV)) as peer:
        for _ in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHURNING_EXPORTER, peer.handles[0].hex()],
                stdout=subprocess.PIPE,
                env=env,
            )
            try:
                assert readline(proc.stdout, 60, "exporter").strip() == "churning"
                time.sleep(random.uniform(0.05, 0.4))
                with open(f"/proc/{proc.pid}/maps") as f:
                    maps = f.read()
                links = []
                for name in os.listdir(f"/proc/{proc.pid}/fd"):
                    try:
                        links.append(os.readlink(f"/proc/{proc.pid}/fd/{name}"))
                    except OSError:
                        pass
            finally:
                proc.kill()
                proc.wait(30)
            assert "/dev/shm" not in maps and str(tmp_path) not in maps
            assert not [link for link in links if "/dev/shm" in link or str(tmp_path) in link]
            assert "memfd:hipipc" in maps
            with open("/proc/net/unix") as f:
                assert f"hipipc.fd.{os.geteuid()}.{proc.pid}." not in f.read()
            assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("transport", ["store", "fd"])
@pytest.mark.parametrize("ticket", [b"short", 12345, b"x" * 17, "a" * 16])
def test_a_malformed_ticket_in_a_pickle_is_invalid_value_and_takes_no_reference(ticket, transport):
    from hipipc.buffer import _rebuild

    with Exporter([4096], env=child_env(HIPIPC_TRANSPORT=transport)) as exporter:
        raw = exporter.handles[0]
        hip.hipIpcCloseMemHandle(hip.hipIpcOpenMemHandle(raw))  # caches what open caches
        before = _fd_count()
        with pytest.raises(hip.HipError) as exc:
            _rebuild(raw, ticket).close()
        assert exc.value.code == E.hipErrorInvalidValue and "ticket" in str(exc.value)
        ptr = hip.hipIpcOpenMemHandle(raw)  # open already: the ticket is only consumed
        try:
            with pytest.raises(hip.HipError) as exc:
                _rebuild(raw, ticket).close()
            assert exc.value.code == E.hipErrorInvalidValue
        finally:
            hip.hipIpcCloseMemHandle(ptr)
        # The refused rebuild took no reference: the one close above unmapped the import.
        with pytest.raises(hip.HipError):
            hip.hipIpcCloseMemHandle(ptr)
        assert _fd_count() == before


_FIRST_EXPORT_AT_THE_LIMIT = """
import json, os, resource
import hipipc as hip
from hipipc.registry import get_registry

get_registry()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
filler = []
while True:
    try:
        filler.append(os.dup(0))
    except OSError:
        break
first = None
try:
    hip.hipFree(hip.hipMalloc(4096))
except hip.HipError as exc:
    first = exc.code.name
for fd in filler:
    os.close(fd)
ptr = hip.hipMalloc(4096)  # descriptors are free again: this must work
hip.hipIpcGetMemHandle(ptr)
hip.hipFree(ptr)
print(json.dumps(first))
"""


def test_the_first_fd_allocation_at_the_descriptor_limit_does_not_spoil_later_ones():
    first = run_json(_FIRST_EXPORT_AT_THE_LIMIT, env=child_env(**FD_ENV))
    assert first == "hipErrorOutOfMemory", first


def test_the_own_start_time_is_not_spoiled_by_a_first_read_at_the_descriptor_limit():
    # The kernel support is known already; the first allocation is the first to ask for this
    # process's start time (/proc/self/stat), at the limit.
    code = _FIRST_EXPORT_AT_THE_LIMIT.replace(
        "get_registry()\n",
        "get_registry()\nfrom hipipc.fdtransport import fd_route_supported\n"
        "assert fd_route_supported()\n",
    )
    first = run_json(code, env=child_env(**FD_ENV))
    assert first in ("hipErrorOutOfMemory", None), first


# -- an exporter whose code closed hipipc's descriptor behind its back -------------------------


@pytest.mark.parametrize("reused", [False, True])
def test_hipfree_after_the_user_closed_the_exported_descriptor(tmp_path, reused):
    buf = hip.DeviceBuffer.allocate(4096, transport="fd")
    route = hip.hipIpcGetMemHandle(buf.ptr).fd_route
    os.close(route.fd)  # e.g. a daemonizing library's closerange
    mine = None
    if reused:
        mine = open(tmp_path / "users-own-file", "wb")  # the lowest free number: route.fd
        assert mine.fileno() == route.fd
    try:
        hip.hipFree(buf.ptr)  # neither a bare OSError nor a close of the user's file
        if mine is not None:
            os.fstat(mine.fileno())  # still open
            assert os.readlink(f"/proc/self/fd/{route.fd}").endswith("users-own-file")
    finally:
        if mine is not None:
            mine.close()


_THREADS_ON_ONE_ALLOCATION = """
import json, os, pickle, random, subprocess, sys, threading, time
import hipipc as hip
from hipipc import fdserver

sys.setswitchinterval(1e-6)  # switch threads often: widen any window between two steps
base = len(os.listdir("/proc/self/fd"))
errors, counts = [], {"export": 0, "pickle": 0, "refused": 0}
rounds = int(sys.argv[1])
for _ in range(rounds):
    buf = hip.DeviceBuffer.allocate(4096)
    ptr = buf.ptr
    raw = bytes(hip.hipIpcGetMemHandle(ptr))
    go = threading.Barrier(4)
    mark = counts["export"]

    def exporter():
        go.wait(30)
        for _ in range(100000):  # until the free refuses it (bounded)
            try:
                assert bytes(hip.hipIpcGetMemHandle(ptr)) == raw
                counts["export"] += 1
                pickle.dumps(buf)
                counts["pickle"] += 1
            except hip.HipError as exc:
                if exc.code not in (hip.hipError_t.hipErrorInvalidValue,
                                    hip.hipError_t.hipErrorInvalidResourceHandle):
                    errors.append(repr(exc))
                counts["refused"] += 1
                return
            except BaseException as exc:
                errors.append(repr(exc))
                return

    def freer():
        go.wait(30)
        end = time.monotonic() + 30
        while counts["export"] - mark < 10 and time.monotonic() < end:  # amid the exports
            time.sleep(0.0005)
        time.sleep(random.uniform(0, 0.005))
        hip.hipFree(ptr)

    def fetcher():  # the server route, in this process: offer/withdraw racing fetch
        h = hip.IpcMemHandle(raw)
        r = h.fd_route
        go.wait(30)
        for _ in range(30):
            try:
                os.close(fdserver.fetch(r.pid, r.start, h.uid, h.segment_name, 10.0))
            except hip.HipError as exc:
                if exc.code != hip.hipError_t.hipErrorInvalidResourceHandle:
                    errors.append(repr(exc))
            except BaseException as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=f) for f in (exporter, exporter, freer, fetcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
# Tickets still pending hold the server's references: the exit rule's revocation drops them.
from hipipc.registry import get_registry
get_registry().revoke_all()
fdserver.withdraw_all()
left = len(os.listdir("/proc/self/fd")) - base
print(json.dumps({"errors": errors[:5], "counts": counts, "left": left}))
"""


def test_export_pickle_free_and_fetch_of_one_allocation_from_several_threads():
    got = run_json(_THREADS_ON_ONE_ALLOCATION, "10", env=child_env(**FD_ENV), timeout=240)
    assert got["errors"] == [], got
    assert got["counts"]["export"] > 0 and got["counts"]["refused"] > 0, got
    assert got["left"] <= 0, got


# -- a buffer freed by the garbage collector inside a critical section ------------------------

_CYCLES = """
import gc, sys
import hipipc as hip

class Cycle:
    pass

gc.set_threshold(5)  # collect often: a cycle's DeviceBuffer is freed wherever that happens
for i in range(int(sys.argv[1])):
    c = Cycle()
    c.self = c
    c.buf = hip.DeviceBuffer.allocate(4096)
    hip.hipIpcGetMemHandle(c.buf.ptr)
    pickle_me = c.buf.__reduce__() if i % 7 == 0 else None  # tickets: once-keys too
    del c, pickle_me
gc.collect()
print("survived", flush=True)
"""


def test_buffers_in_reference_cycles_freed_by_the_collector_amid_exports_do_not_deadlock():
    # Before the fix, a collection inside FdTransport.publish (its lock held) ran the
    # garbage buffer's hipFree, which took the same lock: the export hung forever.
    proc = subprocess.run(
        [sys.executable, "-c", _CYCLES, "3000"],
        capture_output=True,
        timeout=90,  # a hang raises TimeoutExpired (the child is killed)
        env=child_env(**FD_ENV),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == b"survived", proc.stderr[-2000:]
